package stompgate.testserver;

import java.util.List;
import java.util.Map;
import java.util.Map.Entry;
import java.util.concurrent.ConcurrentHashMap;

import de.bwaldvogel.mongo.backend.AbstractUniqueIndex;
import de.bwaldvogel.mongo.backend.IndexKey;
import de.bwaldvogel.mongo.backend.KeyValue;

/** The stock in-memory unique index (MemoryUniqueIndex), over {@link TestCollection}'s record ids. */
final class UniqueIndex extends AbstractUniqueIndex<Long> {

    private final Map<KeyValue, Long> index = new ConcurrentHashMap<>();

    UniqueIndex(String name, List<IndexKey> keys, boolean sparse) {
        super(name, keys, sparse);
    }

    @Override
    public long getCount() {
        return index.size();
    }

    @Override
    public boolean isEmpty() {
        return index.isEmpty();
    }

    @Override
    public long getDataSize() {
        return getCount();
    }

    @Override
    protected Long removeDocument(KeyValue keyValue) {
        return index.remove(keyValue);
    }

    @Override
    protected boolean putKeyPosition(KeyValue keyValue, Long position) {
        return index.putIfAbsent(keyValue, position) == null;
    }

    @Override
    protected Long getPosition(KeyValue keyValue) {
        return index.get(keyValue);
    }

    @Override
    protected Iterable<Entry<KeyValue, Long>> getIterable() {
        return index.entrySet();
    }
}
