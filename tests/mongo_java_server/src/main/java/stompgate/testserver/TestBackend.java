package stompgate.testserver;

import java.time.Instant;
import java.util.List;
import java.util.concurrent.atomic.AtomicInteger;

import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.MongoVersion;
import de.bwaldvogel.mongo.backend.AbstractMongoBackend;
import de.bwaldvogel.mongo.backend.Cursor;
import de.bwaldvogel.mongo.backend.Utils;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.exception.MongoServerError;
import io.netty.channel.Channel;

/**
 * The backend: databases of {@link TestDatabase}; answers {@code hello}/{@code isMaster} as a standalone MongoDB 6.0
 * and serves {@code getMore} on tailable cursors (see {@link TestCollection.TailableCursor}).
 */
final class TestBackend extends AbstractMongoBackend {

    /** MongoDB 6.0: wire version 17. */
    static final MongoVersion VERSION = new MongoVersion() {
        @Override
        public List<Integer> getVersionArray() {
            return List.of(6, 0, 0);
        }

        @Override
        public int getWireVersion() {
            return 17;
        }
    };

    static final long DEFAULT_AWAIT_MS = 1000; // MongoDB's awaitData getMore wait when maxTimeMS is not given

    private final AtomicInteger connectionIds = new AtomicInteger();

    TestBackend() {
        version(VERSION);
    }

    @Override
    protected MongoDatabase openOrCreateDatabase(String databaseName) {
        return new TestDatabase(databaseName, getCursorRegistry());
    }

    @Override
    public Document handleCommand(Channel channel, String databaseName, String command, Document query) {
        if (command.equalsIgnoreCase("hello") || command.equalsIgnoreCase("isMaster")) {
            return hello(command.equalsIgnoreCase("hello"));
        }
        if (command.equalsIgnoreCase("getMore")) {
            Cursor cursor = getCursorRegistry().getCursor(((Number) query.get(command)).longValue());
            if (cursor instanceof TestCollection.TailableCursor) {
                return tailableGetMore((TestCollection.TailableCursor) cursor, query);
            }
        }
        return super.handleCommand(channel, databaseName, command, query);
    }

    private Document hello(boolean modern) {
        Document response = new Document();
        response.put(modern ? "isWritablePrimary" : "ismaster", Boolean.TRUE);
        response.put("helloOk", Boolean.TRUE);
        response.put("maxBsonObjectSize", 16 * 1024 * 1024);
        response.put("maxMessageSizeBytes", 48_000_000);
        response.put("maxWriteBatchSize", 100_000);
        response.put("localTime", Instant.now(getClock()));
        response.put("connectionId", connectionIds.incrementAndGet());
        response.put("minWireVersion", 0);
        response.put("maxWireVersion", VERSION.getWireVersion());
        response.put("readOnly", Boolean.FALSE);
        // no logicalSessionTimeoutMinutes: no sessions, so drivers send no lsid/txnNumber and retry no writes
        Utils.markOkay(response);
        return response;
    }

    private Document tailableGetMore(TestCollection.TailableCursor cursor, Document query) {
        int batchSize = ((Number) query.getOrDefault("batchSize", 0)).intValue();
        Object maxTime = query.get("maxTimeMS");
        long awaitMs = maxTime instanceof Number ? ((Number) maxTime).longValue() : DEFAULT_AWAIT_MS;
        List<Document> batch;
        try {
            batch = cursor.collection().tailableGetMore(cursor, batchSize, awaitMs);
        } catch (MongoServerError e) {
            getCursorRegistry().remove(cursor.getId()); // MongoDB kills a cursor whose getMore failed
            throw e;
        }
        long id = cursor.isKilled() ? 0 : cursor.getId(); // killed while it waited: report it dead
        return TestDatabase.cursorResponse(cursor.namespace(), "nextBatch", batch, id);
    }

    @Override
    protected Document handleKillCursors(Document query) {
        for (Object id : (List<?>) query.get("cursors")) {
            try {
                Cursor cursor = getCursorRegistry().getCursor(((Number) id).longValue());
                if (cursor instanceof TestCollection.TailableCursor) {
                    ((TestCollection.TailableCursor) cursor).kill(); // wakes a getMore blocked on it
                }
            } catch (MongoServerError e) {
                // not found: the stock handler reports it
            }
        }
        return super.handleKillCursors(query);
    }
}
