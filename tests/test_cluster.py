from tirsynth import cluster

GIB = 2**30


def test_object_store_is_a_share_of_the_machine_within_shared_memory():
    assert cluster.local_object_store_bytes(64 * GIB, 64 * GIB) == int(0.3 * 64 * GIB)
    # A container's small /dev/shm bounds it rather than sending Ray to a disk store.
    assert cluster.local_object_store_bytes(64 * GIB, 2 * GIB) == int(0.9 * 2 * GIB)
    assert cluster.local_object_store_bytes(GIB // 2, GIB) == cluster.MIN_OBJECT_STORE_BYTES
    assert cluster.local_object_store_bytes() >= cluster.MIN_OBJECT_STORE_BYTES
