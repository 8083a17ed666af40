package stompgate.testserver;

import java.util.concurrent.CompletableFuture;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;

import de.bwaldvogel.mongo.MongoBackend;
import de.bwaldvogel.mongo.wire.MongoDatabaseHandler;
import de.bwaldvogel.mongo.wire.MongoExceptionHandler;
import de.bwaldvogel.mongo.wire.MongoWireMessageEncoder;
import de.bwaldvogel.mongo.wire.MongoWireProtocolHandler;
import de.bwaldvogel.mongo.wire.MongoWireReplyEncoder;
import de.bwaldvogel.mongo.wire.message.ClientRequest;
import io.netty.bootstrap.ServerBootstrap;
import io.netty.channel.Channel;
import io.netty.channel.ChannelHandlerContext;
import io.netty.channel.ChannelInitializer;
import io.netty.channel.ChannelOption;
import io.netty.channel.EventLoopGroup;
import io.netty.channel.group.ChannelGroup;
import io.netty.channel.group.DefaultChannelGroup;
import io.netty.channel.nio.NioEventLoopGroup;
import io.netty.channel.socket.SocketChannel;
import io.netty.channel.socket.nio.NioServerSocketChannel;
import io.netty.util.AttributeKey;
import io.netty.util.concurrent.DefaultThreadFactory;
import io.netty.util.concurrent.GlobalEventExecutor;

/**
 * An in-memory MongoDB wire-protocol server for stompgate's tests, built on mongo-java-server 1.47.0 (BSD licence).
 * Built by .ci/services.sh, started by tests/mongo_java_server.py: {@code java -jar stompgate-mongo-test-server.jar
 * [HOST [PORT]]} (defaults 127.0.0.1 27017; the jar's manifest names lib/*.jar); prints one "listening on HOST:PORT"
 * line once bound; SIGTERM stops it. Data lives in memory only: a restart starts empty.
 *
 * <p>What it adds to the stock in-memory backend, for the code paths a real MongoDB takes:
 * <ul>
 * <li>{@code hello} / {@code isMaster} reporting a standalone MongoDB 6.0 (maxWireVersion 17, minWireVersion 0), so
 *     current PyMongo connects (stock 1.47.0 reports wire version 8, which PyMongo 4.20 refuses);</li>
 * <li>capped collections ({@code create} with {@code capped}, {@code size}, {@code max}): the oldest documents in
 *     insertion order are removed when an insert passes {@code max} documents or {@code size} bytes (BSON size);
 *     {@code listCollections} / {@code collStats} report the capped options;</li>
 * <li>natural order = insertion order for every collection (record ids only grow; the stock backend reuses freed
 *     slots);</li>
 * <li>tailable (awaitData) cursors on capped collections: a {@code getMore} returns the documents inserted after the
 *     cursor's position, blocks until one is inserted or {@code maxTimeMS} (default 1 s) passes, keeps the cursor
 *     alive, and fails with CappedPositionLost (136) when the record the cursor last examined was deleted; as in
 *     MongoDB a tailable find on an empty collection returns a dead cursor;</li>
 * <li>commands run on a thread pool (in order per connection), so a blocked {@code getMore} holds up only its own
 *     connection and never the network event loop;</li>
 * <li>results are deep copies taken while the collection lock is held ({@code find} batches, cursors,
 *     {@code findAndModify} values, aggregation input), so {@code findAndModify} with {@code new: true} returns the
 *     document as written by that very update even under concurrent updates;</li>
 * <li>updates with an aggregation pipeline ({@code $set}/{@code $addFields} evaluated against the stage input as in
 *     MongoDB, {@code $unset}, {@code $project}, {@code $replaceRoot}/{@code $replaceWith}), including upserts; an
 *     {@code update} command holding one stops at the first error when ordered;</li>
 * <li>{@code insert}: ordered unless told otherwise, and {@code n} counts the documents inserted (stock: all sent),
 *     so drivers report the right {@code nInserted} next to a duplicate-key error;</li>
 * <li>{@code listCollections} honours a {@code filter} on {@code name} (drivers' {@code options()} relies on it);</li>
 * <li>sorted queries with a small limit (claims: {@code findAndModify} with {@code sort}) keep the first matches
 *     instead of sorting all of them (about twice as fast on 5,000 documents; same order).</li>
 * </ul>
 *
 * <p>What it does NOT emulate: transactions, sessions (no {@code logicalSessionTimeoutMinutes}, so drivers use none
 * and do not retry writes), replica sets, elections and failover, change streams, write concern (accepted and
 * ignored; every write is applied in memory at once), journaling and durability, authentication and TLS,
 * unacknowledged writes (OP_MSG {@code moreToCome}), {@code exhaust} cursors, secondary indexes (accepted, not used:
 * every query scans), {@code findAndModify} with a pipeline update, cursor time-outs, and the many commands and
 * operators mongo-java-server itself lacks.
 */
public final class MongoTestServer {

    private MongoTestServer() {
    }

    @SuppressWarnings("deprecation") // NioEventLoopGroup: the constructor mongo-java-server 1.47.0 uses as well
    public static void main(String[] args) {
        String host = args.length > 0 ? args[0] : "127.0.0.1";
        int port = args.length > 1 ? Integer.parseInt(args[1]) : 27017;

        MongoBackend backend = new TestBackend();
        ExecutorService commands = Executors.newCachedThreadPool(new DefaultThreadFactory("mongo-test-command", true));
        EventLoopGroup boss = new NioEventLoopGroup(1, new DefaultThreadFactory("mongo-test-boss", true));
        EventLoopGroup workers = new NioEventLoopGroup(0, new DefaultThreadFactory("mongo-test-io", true));
        ChannelGroup clients = new DefaultChannelGroup("mongo-test-clients", GlobalEventExecutor.INSTANCE);

        Channel server;
        try {
            server = new ServerBootstrap()
                .group(boss, workers)
                .channel(NioServerSocketChannel.class)
                .option(ChannelOption.SO_BACKLOG, 256)
                .option(ChannelOption.SO_REUSEADDR, Boolean.TRUE) // a restart on the same port right after a kill
                .childOption(ChannelOption.TCP_NODELAY, Boolean.TRUE)
                .childHandler(new ChannelInitializer<SocketChannel>() {
                    @Override
                    public void initChannel(SocketChannel ch) {
                        ch.pipeline().addLast(new MongoWireReplyEncoder());
                        ch.pipeline().addLast(new MongoWireMessageEncoder());
                        ch.pipeline().addLast(new MongoWireProtocolHandler());
                        ch.pipeline().addLast(new OffLoopHandler(backend, clients, commands));
                        ch.pipeline().addLast(new MongoExceptionHandler());
                    }
                })
                .bind(host, port).syncUninterruptibly().channel();
        } catch (RuntimeException e) {
            System.err.println("cannot listen on " + host + ":" + port + ": " + e);
            System.exit(1);
            return;
        }
        System.out.println("listening on " + host + ":" + port);
        System.out.flush();

        Runtime.getRuntime().addShutdownHook(new Thread(() -> {
            server.close().awaitUninterruptibly(2, TimeUnit.SECONDS);
            clients.close().awaitUninterruptibly(2, TimeUnit.SECONDS);
            commands.shutdownNow();
            boss.shutdownGracefully(0, 1, TimeUnit.SECONDS);
            workers.shutdownGracefully(0, 1, TimeUnit.SECONDS);
        }, "mongo-test-shutdown"));
        server.closeFuture().syncUninterruptibly();
    }

    /**
     * The stock handler, with each request run on {@code executor} instead of the event loop. Requests of one
     * connection run one after another in arrival order (a chain of futures kept on the channel).
     */
    static final class OffLoopHandler extends MongoDatabaseHandler {

        private static final AttributeKey<CompletableFuture<Void>> LAST = AttributeKey.valueOf("stompgate.last");

        private final ExecutorService executor;

        OffLoopHandler(MongoBackend backend, ChannelGroup clients, ExecutorService executor) {
            super(backend, clients);
            this.executor = executor;
        }

        @Override
        protected void channelRead0(ChannelHandlerContext ctx, ClientRequest request) {
            // called on the channel's event loop only, so the read-modify-write of the attribute does not race
            CompletableFuture<Void> last = ctx.channel().attr(LAST).get();
            if (last == null) {
                last = CompletableFuture.completedFuture(null);
            }
            ctx.channel().attr(LAST).set(last.thenRunAsync(() -> handle(ctx, request), executor));
        }

        private void handle(ChannelHandlerContext ctx, ClientRequest request) {
            try {
                super.channelRead0(ctx, request); // computes the reply and writes it (netty hands the write to the loop)
            } catch (Throwable t) {
                ctx.fireExceptionCaught(t);
            }
        }
    }
}
