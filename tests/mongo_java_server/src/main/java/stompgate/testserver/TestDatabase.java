package stompgate.testserver;

import java.util.ArrayList;
import java.util.List;

import de.bwaldvogel.mongo.MongoCollection;
import de.bwaldvogel.mongo.backend.AbstractSynchronizedMongoDatabase;
import de.bwaldvogel.mongo.backend.CollectionOptions;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.DatabaseResolver;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.IndexKey;
import de.bwaldvogel.mongo.backend.QueryResult;
import de.bwaldvogel.mongo.backend.Utils;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.exception.MongoServerError;
import de.bwaldvogel.mongo.exception.MongoServerException;
import de.bwaldvogel.mongo.oplog.Oplog;
import io.netty.channel.Channel;

/**
 * A database of {@link TestCollection}s. Handles itself: {@code create} of capped collections, {@code find} (copies
 * taken under the collection lock; tailable cursors), {@code update} commands holding a pipeline update, and adds the
 * capped options and the {@code name} filter to {@code listCollections}. The rest is the stock implementation.
 *
 * <p>Locks: the stock code takes the database lock and then a collection's (index creation); so nothing here calls
 * into the database while holding a collection lock.
 */
final class TestDatabase extends AbstractSynchronizedMongoDatabase<Long> {

    private String cappedName; // the capped collection being created (guarded by this)
    private Document cappedSpec;

    TestDatabase(String databaseName, CursorRegistry cursorRegistry) {
        super(databaseName, cursorRegistry);
        initializeNamespacesAndIndexes();
    }

    @Override
    protected MongoCollection<Long> openOrCreateCollection(String collectionName, CollectionOptions options) {
        Document capped = collectionName.equals(cappedName) ? cappedSpec : null;
        return new TestCollection(this, collectionName, options, cursorRegistry, capped);
    }

    @Override
    protected Index<Long> openOrCreateUniqueIndex(String collectionName, String indexName, List<IndexKey> keys,
                                                  boolean sparse) {
        return new UniqueIndex(indexName, keys, sparse);
    }

    @Override
    protected long getStorageSize() {
        return 0;
    }

    @Override
    protected long getFileSize() {
        return 0;
    }

    @Override
    public Document handleCommand(Channel channel, String command, Document query, DatabaseResolver resolver,
                                  Oplog oplog) {
        if (command.equalsIgnoreCase("create") && Utils.isTrue(query.get("capped"))) {
            return createCapped(query.get(command).toString(), query);
        } else if (command.equalsIgnoreCase("find")) {
            return find(query.get(command).toString(), query);
        } else if (command.equalsIgnoreCase("update") && hasPipelineUpdate(query)) {
            return updateWithPipelines(channel, query, resolver, oplog);
        } else if (command.equalsIgnoreCase("insert")) {
            return insert(channel, command, query, resolver, oplog);
        } else if (command.equalsIgnoreCase("listCollections")) {
            return listCollections(super.handleCommand(channel, command, query, resolver, oplog), query);
        }
        return super.handleCommand(channel, command, query, resolver, oplog);
    }

    static Document cursorResponse(String namespace, String batchKey, List<Document> batch, long cursorId) {
        Document cursor = new Document("id", cursorId).append("ns", namespace).append(batchKey, batch);
        Document response = new Document("cursor", cursor);
        Utils.markOkay(response);
        return response;
    }

    private TestCollection collection(String name) {
        MongoCollection<Long> collection = resolveCollection(name, false);
        return collection instanceof TestCollection ? (TestCollection) collection : null;
    }

    // -- create capped -------------------------------------------------------------------------------------------------

    private synchronized Document createCapped(String name, Document query) {
        if (!(query.get("size") instanceof Number)) {
            throw new MongoServerError(72, "InvalidOptions", "the 'size' field is required when 'capped' is true");
        }
        cappedName = name;
        cappedSpec = query;
        try {
            createCollectionOrThrowIfExists(name, CollectionOptions.withDefaults()); // -> openOrCreateCollection
        } finally {
            cappedName = null;
            cappedSpec = null;
        }
        Document response = new Document();
        Utils.markOkay(response);
        return response;
    }

    // -- find ----------------------------------------------------------------------------------------------------------

    private Document find(String name, Document query) {
        String namespace = getFullCollectionNamespace(name);
        TestCollection collection = collection(name);
        if (collection == null) {
            return cursorResponse(namespace, "firstBatch", List.of(), 0);
        }
        Document filter = (Document) query.getOrDefault("filter", new Document());
        Document sort = (Document) query.get("sort");
        Document projection = (Document) query.get("projection");
        int batchSize = intOf(query.get("batchSize"), 0);
        if (Utils.isTrue(query.get("tailable"))) {
            if (sort != null && !sort.isEmpty() && !sort.equals(new Document("$natural", 1))) {
                throw new MongoServerError(2, "BadValue", "cannot use tailable option with a sort other than {$natural: 1}");
            }
            if (!collection.isCapped()) {
                throw new MongoServerError(2, "BadValue",
                    "error processing query: ns=" + namespace + " tailable cursor requested on non capped collection");
            }
            TestCollection.TailableCursor cursor = new TestCollection.TailableCursor(cursorRegistry.generateCursorId(),
                collection, namespace, filter, projection, Utils.isTrue(query.get("awaitData")));
            List<Document> batch = collection.tailableFirstBatch(cursor, batchSize > 0 ? batchSize : 101);
            if (batch == null) { // an empty collection: MongoDB keeps no tailable cursor (SERVER-13955)
                return cursorResponse(namespace, "firstBatch", List.of(), 0);
            }
            cursorRegistry.add(cursor);
            return cursorResponse(namespace, "firstBatch", batch, cursor.getId());
        }
        QueryResult result = collection.findCopies(filter, sort, intOf(query.get("skip"), 0),
            Math.abs(intOf(query.get("limit"), 0)), batchSize, projection);
        long cursorId = result.getCursorId();
        if (cursorId != 0 && Utils.isTrue(query.get("singleBatch"))) {
            cursorRegistry.remove(cursorId);
            cursorId = 0;
        }
        return cursorResponse(namespace, "firstBatch", result.collectDocuments(), cursorId);
    }

    private static int intOf(Object value, int fallback) {
        return value instanceof Number ? ((Number) value).intValue() : fallback;
    }

    // -- insert --------------------------------------------------------------------------------------------------------

    /** The stock command, ordered by default and with {@code n} = the documents inserted (stock: all of them). */
    @SuppressWarnings("unchecked")
    private Document insert(Channel channel, String command, Document query, DatabaseResolver resolver, Oplog oplog) {
        query.putIfAbsent("ordered", Boolean.TRUE);
        Document response = super.handleCommand(channel, command, query, resolver, oplog);
        List<Document> errors = (List<Document>) response.get("writeErrors");
        if (errors != null && !errors.isEmpty()) {
            int documents = ((List<?>) query.get("documents")).size();
            boolean ordered = Utils.isTrue(query.get("ordered"));
            response.put("n", ordered ? ((Number) errors.get(0).get("index")).intValue() : documents - errors.size());
        }
        return response;
    }

    // -- update with pipelines ---------------------------------------------------------------------------------------

    private static boolean hasPipelineUpdate(Document query) {
        for (Object statement : (List<?>) query.get("updates")) {
            if (((Document) statement).get("u") instanceof List) {
                return true;
            }
        }
        return false;
    }

    /**
     * An {@code update} command with at least one pipeline statement: those run here, the others through the stock
     * command one statement at a time; stops at the first error when ordered (the default), like MongoDB.
     */
    @SuppressWarnings("unchecked")
    private Document updateWithPipelines(Channel channel, Document query, DatabaseResolver resolver, Oplog oplog) {
        String name = query.get("update").toString();
        boolean ordered = !Boolean.FALSE.equals(query.get("ordered"));
        List<Document> statements = (List<Document>) query.get("updates");
        int matched = 0;
        int modified = 0;
        List<Document> upserted = new ArrayList<>();
        List<Document> writeErrors = new ArrayList<>();
        for (int i = 0; i < statements.size(); i++) {
            Document statement = statements.get(i);
            Document result;
            try {
                if (statement.get("u") instanceof List) {
                    resolveOrCreateCollection(name);
                    TestCollection collection = collection(name);
                    result = collection.updateWithPipeline((Document) statement.get("q"),
                        (List<Document>) statement.get("u"), Utils.isTrue(statement.get("multi")),
                        Utils.isTrue(statement.get("upsert")), oplog);
                } else {
                    Document single = new Document("update", name).append("updates", List.of(statement))
                        .append("ordered", Boolean.TRUE);
                    result = super.handleCommand(channel, "update", single, resolver, oplog);
                    List<Document> errors = (List<Document>) result.get("writeErrors");
                    if (errors != null && !errors.isEmpty()) {
                        Document error = new Document(errors.get(0));
                        error.put("index", i);
                        throw new StatementError(error);
                    }
                    List<Document> ups = (List<Document>) result.get("upserted");
                    if (ups != null && !ups.isEmpty()) {
                        result.put("upserted", ups.get(0).get("_id"));
                        result.put("n", ((Number) result.get("n")).intValue() - 1);
                    }
                }
            } catch (StatementError e) {
                writeErrors.add(e.error);
                if (ordered) {
                    break;
                }
                continue;
            } catch (MongoServerException e) {
                Document error = new Document("index", i).append("errmsg", e.getMessageWithoutErrorCode());
                if (e instanceof MongoServerError) {
                    error.put("code", ((MongoServerError) e).getCode());
                    error.putIfNotNull("codeName", ((MongoServerError) e).getCodeName());
                }
                writeErrors.add(error);
                if (ordered) {
                    break;
                }
                continue;
            }
            matched += ((Number) result.get("n")).intValue();
            modified += ((Number) result.get("nModified")).intValue();
            if (result.containsKey("upserted")) {
                upserted.add(new Document("index", i).append("_id", result.get("upserted")));
            }
        }
        Document response = new Document("n", matched + upserted.size()).append("nModified", modified);
        if (!upserted.isEmpty()) {
            response.put("upserted", upserted);
        }
        if (!writeErrors.isEmpty()) {
            response.put("writeErrors", writeErrors);
        }
        Utils.markOkay(response);
        return response;
    }

    private static final class StatementError extends RuntimeException {
        private static final long serialVersionUID = 1L;
        final Document error;

        StatementError(Document error) {
            super(null, null, false, false);
            this.error = error;
        }
    }

    // -- listCollections -----------------------------------------------------------------------------------------------

    /** The stock answer, filtered by a plain {@code filter.name} and with the options of capped collections. */
    @SuppressWarnings("unchecked")
    private Document listCollections(Document response, Document query) {
        Document cursor = (Document) response.get("cursor");
        Object filter = query.get("filter");
        Object wanted = filter instanceof Document ? ((Document) filter).get("name") : null;
        List<Document> out = new ArrayList<>();
        for (Document description : (List<Document>) cursor.get("firstBatch")) {
            String name = description.get("name").toString();
            if (wanted instanceof String && !wanted.equals(name)) {
                continue;
            }
            TestCollection collection = collection(name);
            if (collection != null && collection.isCapped()) {
                description.put("options", collection.cappedOptions());
            }
            out.add(description);
        }
        cursor.put("firstBatch", out);
        return response;
    }
}
