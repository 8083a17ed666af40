import stomp_core


def test_all_matches_exports() -> None:
    public = {name for name in vars(stomp_core) if not name.startswith("_")}
    modules = {
        "connection", "errors", "events", "frame", "heartbeat", "limits", "negotiation", "parser", "serializer",
        "states", "escaping", "annotations",
    }
    assert set(stomp_core.__all__) == public - modules
    assert len(stomp_core.__all__) == len(set(stomp_core.__all__))
    for name in stomp_core.__all__:
        assert getattr(stomp_core, name) is not None
