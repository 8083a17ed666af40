package stompgate.testserver;

import java.util.ArrayList;
import java.util.Collection;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import java.util.stream.Stream;

import de.bwaldvogel.mongo.MongoDatabase;
import de.bwaldvogel.mongo.backend.AbstractSynchronizedMongoCollection;
import de.bwaldvogel.mongo.backend.ArrayFilters;
import de.bwaldvogel.mongo.backend.CollectionOptions;
import de.bwaldvogel.mongo.backend.Cursor;
import de.bwaldvogel.mongo.backend.CursorRegistry;
import de.bwaldvogel.mongo.backend.DocumentWithPosition;
import de.bwaldvogel.mongo.backend.Index;
import de.bwaldvogel.mongo.backend.Missing;
import de.bwaldvogel.mongo.backend.QueryResult;
import de.bwaldvogel.mongo.backend.Utils;
import de.bwaldvogel.mongo.backend.ValueComparator;
import de.bwaldvogel.mongo.backend.aggregation.Expression;
import de.bwaldvogel.mongo.backend.aggregation.stage.AggregationStage;
import de.bwaldvogel.mongo.backend.aggregation.stage.ProjectStage;
import de.bwaldvogel.mongo.backend.aggregation.stage.ReplaceRootStage;
import de.bwaldvogel.mongo.backend.aggregation.stage.UnsetStage;
import de.bwaldvogel.mongo.bson.Document;
import de.bwaldvogel.mongo.bson.ObjectId;
import de.bwaldvogel.mongo.exception.ImmutableFieldException;
import de.bwaldvogel.mongo.exception.MongoServerError;
import de.bwaldvogel.mongo.oplog.Oplog;
import de.bwaldvogel.mongo.wire.bson.BsonEncoder;
import io.netty.buffer.ByteBuf;
import io.netty.buffer.Unpooled;

/**
 * A collection kept in a map from record id to document. Record ids only grow, so natural order is insertion order
 * (a document keeps its record id when updated). Every public method runs under the collection's monitor (the stock
 * base class synchronizes most; the rest are synchronized here), and what leaves it is a deep copy.
 *
 * <p>Capped: after each insert the oldest records are removed while there are more than {@code max} documents or
 * more than {@code size} bytes of BSON. Tailable cursors remember the last record id they examined; an insert wakes
 * the getMores waiting on the collection's monitor.
 */
final class TestCollection extends AbstractSynchronizedMongoCollection<Long> {

    private static final int MAX_BATCH_BYTES = 16 * 1024 * 1024;

    private final TreeMap<Long, Document> records = new TreeMap<>();
    private long nextRecordId = 1;
    private long dataSize;
    private final boolean capped;
    private final long cappedSize;
    private final long cappedMax;

    TestCollection(MongoDatabase database, String name, CollectionOptions options, CursorRegistry cursorRegistry,
                   Document cappedSpec) {
        super(database, name, options, cursorRegistry);
        capped = cappedSpec != null;
        if (capped) {
            long size = ((Number) cappedSpec.get("size")).longValue();
            // MongoDB: at least 4096 bytes, else raised to a multiple of 256
            cappedSize = size <= 4096 ? 4096 : (size + 255) / 256 * 256;
            Object max = cappedSpec.get("max");
            cappedMax = max instanceof Number ? ((Number) max).longValue() : 0;
        } else {
            cappedSize = 0;
            cappedMax = 0;
        }
    }

    boolean isCapped() {
        return capped;
    }

    Document cappedOptions() {
        Document options = new Document("capped", Boolean.TRUE).append("size", cappedSize);
        if (cappedMax > 0) {
            options.put("max", cappedMax);
        }
        return options;
    }

    // -- storage (called by the base class under the monitor) ----------------------------------------------------

    @Override
    protected Long addDocumentInternal(Document document) {
        long id = nextRecordId++;
        records.put(id, document);
        return id;
    }

    @Override
    protected void removeDocument(Long position) {
        records.remove(position);
    }

    @Override
    protected Document getDocument(Long position) {
        return records.get(position);
    }

    @Override
    protected void updateDataSize(int sizeDelta) {
        dataSize += sizeDelta;
    }

    @Override
    protected int getDataSize() {
        return (int) Math.min(Integer.MAX_VALUE, dataSize);
    }

    @Override
    protected void handleUpdate(Long position, Document oldDocument, Document newDocument) {
        // updated in place: same record id
    }

    @Override
    protected QueryResult matchDocuments(Document query, Document orderBy, int numberToSkip, int limit, int batchSize,
                                         Document fieldSelector) {
        Collection<Document> documents = isNaturalDescending(orderBy) ? records.descendingMap().values()
            : records.values();
        return matchDocumentsFromStream(documents.stream(), query, orderBy, numberToSkip, limit, batchSize,
            fieldSelector);
    }

    /**
     * A sorted query with a small {@code skip + limit} (a claim: {@code findAndModify} with {@code sort}, limit 1)
     * keeps only the first {@code skip + limit} matches instead of sorting all of them, and reads each document's sort
     * values once; the order is the stock comparator's (same value comparators), ties in natural order as with the
     * stock stable sort. Measured with the gateway's claim on 5,000 ready documents: 21 ms per claim with the stock
     * full sort, 11 ms like this (most of it now the stock matcher, ~1-2 us per document).
     */
    @Override
    protected QueryResult matchDocumentsFromStream(Stream<Document> documents, Document query, Document orderBy,
                                                   int numberToSkip, int limit, int batchSize,
                                                   Document fieldSelector) {
        int wanted = numberToSkip + limit;
        if (orderBy == null || orderBy.isEmpty() || orderBy.keySet().iterator().next().equals("$natural")
            || limit <= 0 || numberToSkip < 0 || wanted > 1000) {
            return super.matchDocumentsFromStream(documents, query, orderBy, numberToSkip, limit, batchSize,
                fieldSelector);
        }
        String[] keys = orderBy.keySet().toArray(new String[0]);
        ValueComparator[] comparators = new ValueComparator[keys.length];
        for (int i = 0; i < keys.length; i++) {
            comparators[i] = ((Number) orderBy.get(keys[i])).intValue() > 0 ? ValueComparator.asc()
                : ValueComparator.desc();
        }
        List<Object[]> top = new ArrayList<>(wanted + 1); // [sort values..., document]
        documents.filter(document -> documentMatchesQuery(document, query)).forEach(document -> {
            Object[] entry = new Object[keys.length + 1];
            for (int i = 0; i < keys.length; i++) {
                entry[i] = keys[i].indexOf('.') < 0 ? document.getOrMissing(keys[i])
                    : Utils.getSubdocumentValueCollectionAware(document, keys[i]);
            }
            entry[keys.length] = document;
            if (top.size() == wanted && compareSortValues(comparators, entry, top.get(wanted - 1)) >= 0) {
                return;
            }
            int low = 0;
            int high = top.size();
            while (low < high) { // after the equal ones: stable
                int middle = (low + high) >>> 1;
                if (compareSortValues(comparators, top.get(middle), entry) <= 0) {
                    low = middle + 1;
                } else {
                    high = middle;
                }
            }
            top.add(low, entry);
            if (top.size() > wanted) {
                top.remove(wanted);
            }
        });
        List<Document> page = new ArrayList<>();
        for (Object[] entry : top.subList(Math.min(numberToSkip, top.size()), top.size())) {
            page.add((Document) entry[keys.length]);
        }
        return super.matchDocumentsFromStream(query, page.stream(), 0, 0, batchSize, null, fieldSelector);
    }

    private static int compareSortValues(ValueComparator[] comparators, Object[] a, Object[] b) {
        for (int i = 0; i < comparators.length; i++) {
            int cmp = comparators[i].compare(a[i], b[i]);
            if (cmp != 0) {
                return cmp;
            }
        }
        return 0;
    }

    @Override
    protected Long findDocumentPosition(Document document) {
        for (Map.Entry<Long, Document> entry : records.entrySet()) {
            if (entry.getValue() == document) {
                return entry.getKey();
            }
        }
        for (Map.Entry<Long, Document> entry : records.entrySet()) {
            if (entry.getValue().equals(document)) {
                return entry.getKey();
            }
        }
        return null;
    }

    @Override
    protected Stream<DocumentWithPosition<Long>> streamAllDocumentsWithPosition() {
        return records.entrySet().stream().map(entry -> new DocumentWithPosition<>(entry.getValue(), entry.getKey()));
    }

    // -- what the stock base class leaves unsynchronized ----------------------------------------------------------

    @Override
    public synchronized int count() {
        return records.size();
    }

    @Override
    public synchronized boolean isEmpty() {
        return records.isEmpty();
    }

    @Override
    public synchronized int count(Document query, int skip, int limit) {
        return super.count(query, skip, limit);
    }

    @Override
    public synchronized void addIndex(Index<Long> index) {
        super.addIndex(index);
    }

    @Override
    public synchronized void dropIndex(String indexName) {
        super.dropIndex(indexName);
    }

    @Override
    public synchronized Document validate() {
        return super.validate();
    }

    @Override
    public synchronized Document getStats() {
        Document stats = super.getStats();
        stats.put("capped", capped);
        if (capped) {
            stats.put("maxSize", cappedSize);
            if (cappedMax > 0) {
                stats.put("max", cappedMax);
            }
        }
        return stats;
    }

    // -- copies out ------------------------------------------------------------------------------------------------

    /** Read-only callers (aggregation, index listing) get a snapshot of copies. */
    @Override
    public synchronized Iterable<Document> queryAll() {
        return copies(records.values());
    }

    @Override
    public Stream<Document> queryAllAsStream() {
        return ((List<Document>) queryAll()).stream();
    }

    /** {@code find}: the first batch copied here, the rest by {@link #createCursor}. */
    synchronized QueryResult findCopies(Document filter, Document sort, int skip, int limit, int batchSize,
                                        Document projection) {
        QueryResult result = queryDocuments(filter, sort, skip, limit, batchSize, projection);
        return new QueryResult(copies(result), result.getCursorId());
    }

    @Override
    protected Cursor createCursor(List<Document> remainingDocuments) {
        return super.createCursor(copies(remainingDocuments));
    }

    @Override
    public synchronized Document findAndModify(Document query) {
        Document result = super.findAndModify(query);
        Object value = result.get("value");
        if (value instanceof Document) {
            result.put("value", ((Document) value).cloneDeeply()); // as written by this update, not a later one
        }
        return result;
    }

    private static List<Document> copies(Iterable<Document> documents) {
        List<Document> out = new ArrayList<>();
        for (Document document : documents) {
            out.add(document.cloneDeeply());
        }
        return out;
    }

    // -- capped trimming and tailing ---------------------------------------------------------------------------------

    @Override
    public synchronized void addDocument(Document document) {
        super.addDocument(document);
        if (capped) {
            while (records.size() > 1 && ((cappedMax > 0 && records.size() > cappedMax) || dataSize > cappedSize)) {
                removeDocument(records.firstEntry().getValue());
            }
        }
        notifyAll(); // tailable getMores waiting for an insert
    }

    /** A tailable cursor: the filter, and the record id it examined last (MongoDB's "last seen" position). */
    static final class TailableCursor implements Cursor {
        private final long id;
        private final TestCollection collection;
        private final String namespace;
        private final Document filter;
        private final Document projection;
        private final boolean awaitData;
        private long position; // guarded by the collection's monitor
        private volatile boolean killed;

        TailableCursor(long id, TestCollection collection, String namespace, Document filter, Document projection,
                       boolean awaitData) {
            this.id = id;
            this.collection = collection;
            this.namespace = namespace;
            this.filter = filter;
            this.projection = projection;
            this.awaitData = awaitData;
        }

        @Override
        public long getId() {
            return id;
        }

        @Override
        public boolean isEmpty() {
            return false;
        }

        @Override
        public List<Document> takeDocuments(int numberToReturn) {
            throw new UnsupportedOperationException("served by TestBackend");
        }

        TestCollection collection() {
            return collection;
        }

        String namespace() {
            return namespace;
        }

        boolean isKilled() {
            return killed;
        }

        void kill() {
            killed = true;
            synchronized (collection) {
                collection.notifyAll();
            }
        }
    }

    /** The first batch, or null when the collection has no record at all (MongoDB then keeps no cursor). */
    synchronized List<Document> tailableFirstBatch(TailableCursor cursor, int batchSize) {
        if (records.isEmpty()) {
            return null;
        }
        return scan(cursor, batchSize);
    }

    /** The documents after the cursor's position; with awaitData waits up to {@code awaitMs} for an insert. */
    synchronized List<Document> tailableGetMore(TailableCursor cursor, int batchSize, long awaitMs) {
        long deadline = System.nanoTime() + TimeUnit.MILLISECONDS.toNanos(Math.max(0, awaitMs));
        while (true) {
            List<Document> batch = scan(cursor, batchSize);
            long left = deadline - System.nanoTime();
            if (!batch.isEmpty() || !cursor.awaitData || cursor.isKilled() || left <= 0) {
                return batch;
            }
            try {
                TimeUnit.NANOSECONDS.timedWait(this, left); // releases the monitor while waiting
            } catch (InterruptedException e) {
                Thread.currentThread().interrupt();
                return batch;
            }
        }
    }

    private List<Document> scan(TailableCursor cursor, int batchSize) {
        if (cursor.position > 0 && !records.containsKey(cursor.position)) {
            throw new MongoServerError(136, "CappedPositionLost",
                "CollectionScan died due to position in capped collection being deleted. Last seen record id: RecordId("
                    + cursor.position + ")");
        }
        List<Document> batch = new ArrayList<>();
        long bytes = 0;
        for (Map.Entry<Long, Document> entry : records.tailMap(cursor.position, false).entrySet()) {
            if ((batchSize > 0 && batch.size() >= batchSize) || bytes >= MAX_BATCH_BYTES) {
                break;
            }
            cursor.position = entry.getKey();
            if (documentMatchesQuery(entry.getValue(), cursor.filter)) {
                Document document = entry.getValue().cloneDeeply();
                if (cursor.projection != null && !cursor.projection.isEmpty()) {
                    document = apply(new ProjectStage(cursor.projection), document);
                }
                batch.add(document);
                bytes += bsonSize(document);
            }
        }
        return batch;
    }

    private static int bsonSize(Document document) {
        ByteBuf buffer = Unpooled.buffer();
        try {
            BsonEncoder.encodeDocument(document, buffer);
            return buffer.writerIndex();
        } finally {
            buffer.release();
        }
    }

    // -- pipeline updates --------------------------------------------------------------------------------------------

    /**
     * One update statement whose {@code u} is a pipeline: each matching document (the first only unless
     * {@code multi}) is run through the stages and written back whole; upsert runs them on the query's equality fields.
     * Returns {@code {n, nModified[, upserted]}} like the stock {@code updateDocuments}.
     */
    synchronized Document updateWithPipeline(Document selector, List<Document> pipeline, boolean multi, boolean upsert,
                                             Oplog oplog) {
        List<Document> matched = new ArrayList<>();
        for (Document document : queryDocuments(selector, null, 0, multi ? 0 : 1, 0, null)) {
            matched.add(document);
        }
        int modified = 0;
        for (Document document : matched) {
            Object id = document.get(getIdField());
            Document updated = runPipeline(document.cloneDeeply(), pipeline);
            if (updated.containsKey(getIdField()) && !java.util.Objects.equals(updated.get(getIdField()), id)) {
                throw new ImmutableFieldException("Performing an update on the path '_id' would modify the immutable field '_id'");
            }
            if (!updated.equals(document)) {
                updateDocuments(new Document(getIdField(), id), updated, ArrayFilters.empty(), false, false, oplog);
                modified++;
            }
        }
        Document result = new Document("n", matched.size()).append("nModified", modified);
        if (matched.isEmpty() && upsert) {
            Document base = new Document();
            equalityFields(selector, base);
            Document inserted = runPipeline(base, pipeline);
            if (!inserted.containsKey(getIdField())) {
                Document withId = new Document(getIdField(), new ObjectId());
                withId.putAll(inserted);
                inserted = withId;
            }
            addDocument(inserted);
            result.put("upserted", inserted.get(getIdField()));
        }
        return result;
    }

    @SuppressWarnings("unchecked")
    private static void equalityFields(Document selector, Document into) {
        for (Map.Entry<String, Object> entry : selector.entrySet()) {
            String key = entry.getKey();
            Object value = entry.getValue();
            if (key.equals("$and")) {
                for (Document part : (List<Document>) value) {
                    equalityFields(part, into);
                }
            } else if (!key.startsWith("$") && !key.contains(".")
                && !(value instanceof Document && ((Document) value).keySet().stream().anyMatch(k -> k.startsWith("$")))) {
                into.put(key, value);
            }
        }
    }

    private static Document runPipeline(Document document, List<Document> pipeline) {
        for (Document stage : pipeline) {
            if (stage.size() != 1) {
                throw new MongoServerError(40323, "A pipeline stage specification object must contain exactly one field.");
            }
            String name = stage.keySet().iterator().next();
            Object spec = stage.get(name);
            switch (name) {
                case "$set":
                case "$addFields":
                    document = setFields(document, (Document) spec);
                    break;
                case "$unset":
                    document = apply(new UnsetStage(spec), document);
                    break;
                case "$project":
                    document = apply(new ProjectStage(spec), document);
                    break;
                case "$replaceRoot":
                    document = apply(new ReplaceRootStage((Document) spec), document);
                    break;
                case "$replaceWith":
                    document = apply(new ReplaceRootStage(new Document("newRoot", spec)), document);
                    break;
                default:
                    throw new MongoServerError(72, "InvalidOptions",
                        name + " is not allowed to be used within an update");
            }
        }
        return document;
    }

    private static Document apply(AggregationStage stage, Document document) {
        List<Document> out = stage.apply(Stream.of(document)).collect(Collectors.toList());
        return out.get(0);
    }

    /** {@code $set}/{@code $addFields}: every expression sees the stage's input, as in MongoDB. */
    private static Document setFields(Document input, Document spec) {
        Document output = input.cloneDeeply();
        for (Map.Entry<String, Object> entry : spec.entrySet()) {
            setField(output, entry.getKey(), entry.getValue(), input);
        }
        return output;
    }

    private static void setField(Document target, String path, Object spec, Document input) {
        int dot = path.indexOf('.');
        if (dot > 0) {
            setField(subDocument(target, path.substring(0, dot)), path.substring(dot + 1), spec, input);
            return;
        }
        if (spec instanceof Document && !((Document) spec).isEmpty()
            && !((Document) spec).keySet().iterator().next().startsWith("$")) {
            Document sub = subDocument(target, path); // {a: {b: ...}} adds to the embedded document a
            for (Map.Entry<String, Object> entry : ((Document) spec).entrySet()) {
                setField(sub, entry.getKey(), entry.getValue(), input);
            }
            return;
        }
        Object value = Expression.evaluateDocument(spec, input);
        if (value instanceof Missing) {
            target.remove(path);
        } else {
            target.put(path, value);
        }
    }

    private static Document subDocument(Document target, String key) {
        Object existing = target.get(key);
        Document sub = existing instanceof Document ? (Document) existing : new Document();
        target.put(key, sub);
        return sub;
    }
}
