package stompgate.peers;

import java.io.File;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.atomic.AtomicBoolean;

import org.apache.activemq.artemis.core.config.Configuration;
import org.apache.activemq.artemis.core.config.impl.ConfigurationImpl;
import org.apache.activemq.artemis.core.io.aio.AIOSequentialFileFactory;
import org.apache.activemq.artemis.core.server.JournalType;
import org.apache.activemq.artemis.core.server.embedded.EmbeddedActiveMQ;
import org.apache.activemq.artemis.core.settings.impl.AddressSettings;

/**
 * An embedded Apache Artemis broker with ONE acceptor, STOMP only, on 127.0.0.1:PORT:
 * the yardstick for {@code stompgate bench --compare}.
 *
 * <pre>java -jar artemis-stomp-peer.jar [PORT] [DATA_DIR] [auto|nio|asyncio]</pre>
 *
 * Persistent (journal, bindings, paging and large messages all under DATA_DIR), security off,
 * /queue/X and /topic/X auto-created as anycast and multicast addresses. Prints
 * "ARTEMIS READY PORT" on stdout once the acceptor listens; SIGTERM (or SIGINT) stops it and
 * the JVM exits 0. Everything else (Artemis's own log lines, which journal was chosen) goes to stderr.
 */
public final class ArtemisStompPeer {

    public static void main(String[] args) throws Exception {
        int port = args.length > 0 ? Integer.parseInt(args[0]) : 61617;
        File data = new File(args.length > 1 ? args[1] : "/tmp/artemis-data").getAbsoluteFile();
        String journal = args.length > 2 ? args[2].toLowerCase() : "auto";
        if (!data.isDirectory() && !data.mkdirs()) {
            throw new IllegalStateException("cannot create data directory " + data);
        }

        JournalType type;
        switch (journal) {
            case "nio": type = JournalType.NIO; break;
            case "asyncio": case "aio": type = JournalType.ASYNCIO; break;
            case "auto":
                // ASYNCIO needs libaio on the machine (and a file system with O_DIRECT); else NIO.
                type = AIOSequentialFileFactory.isSupported(data) ? JournalType.ASYNCIO : JournalType.NIO;
                break;
            default: throw new IllegalArgumentException("journal type must be auto, nio or asyncio: " + journal);
        }

        Configuration config = new ConfigurationImpl()
            .setName("stompgate-peer")
            .setPersistenceEnabled(true)
            .setJournalType(type)
            .setJournalDirectory(new File(data, "journal").getPath())
            .setBindingsDirectory(new File(data, "bindings").getPath())
            .setPagingDirectory(new File(data, "paging").getPath())
            // Bodies over the STOMP acceptor's stompMinLargeMessageSize (default 100 KiB) are
            // stored as one file each here, beside the journal.
            .setLargeMessagesDirectory(new File(data, "large-messages").getPath())
            .setNodeManagerLockDirectory(new File(data, "journal").getPath())
            .setSecurityEnabled(false)
            .setJMXManagementEnabled(false)
            .addAcceptorConfiguration("stomp", "tcp://127.0.0.1:" + port
                + "?protocols=STOMP;anycastPrefix=/queue/;multicastPrefix=/topic/");
        config.addAddressSetting("#", new AddressSettings()
            .setAutoCreateQueues(true)
            .setAutoCreateAddresses(true));

        EmbeddedActiveMQ server = new EmbeddedActiveMQ();
        server.setConfiguration(config);

        CountDownLatch stopped = new CountDownLatch(1);
        AtomicBoolean stopping = new AtomicBoolean();
        Runnable stop = () -> {
            if (!stopping.compareAndSet(false, true)) {
                return;
            }
            try {
                server.stop();
            } catch (Exception e) {
                e.printStackTrace();
            } finally {
                stopped.countDown();
            }
        };
        // Handle TERM/INT ourselves so the broker closes its journal and the JVM exits 0;
        // the shutdown hook covers any other exit.
        for (String sig : new String[] {"TERM", "INT"}) {
            sun.misc.Signal.handle(new sun.misc.Signal(sig), s -> new Thread(stop, "artemis-stop").start());
        }
        Runtime.getRuntime().addShutdownHook(new Thread(stop, "artemis-shutdown-hook"));

        server.start();
        System.err.println("artemis: journal " + type + ", data " + data + ", STOMP on 127.0.0.1:" + port);
        System.out.println("ARTEMIS READY " + port);
        System.out.flush();

        stopped.await();
        System.err.println("artemis: stopped");
        System.exit(0);
    }
}
