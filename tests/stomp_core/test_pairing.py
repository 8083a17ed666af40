"""A client and a server connection talking with no socket in between."""

from stomp_core import (
    Ack,
    ClientConnection,
    ConnectRequested,
    Connected,
    Disconnect,
    MessageReceived,
    ReceiptReceived,
    Send,
    ServerConnection,
    Subscribe,
)


def pump_to_server(client: ClientConnection, server: ServerConnection) -> list[object]:
    return list(server.receive_data(client.data_to_send()))


def pump_to_client(server: ServerConnection, client: ClientConnection) -> list[object]:
    return list(client.receive_data(server.data_to_send()))


def test_full_session_in_every_version() -> None:
    for version in ("1.0", "1.1", "1.2"):
        client, server = ClientConnection(), ServerConnection()
        client.connect(accept_version=[version], login="guest", passcode="gu:est\\", heartbeat=(1000, 1000))
        (connect,) = pump_to_server(client, server)
        assert isinstance(connect, ConnectRequested) and connect.passcode == "gu:est\\"
        server.accept(session="sess", heartbeat=(2000, 2000))
        (connected,) = pump_to_client(server, client)
        assert isinstance(connected, Connected) and client.version == server.version == version

        client.subscribe("/queue/a:b", "sub-1", ack="client")
        client.send("/queue/a:b", b"\x00binary\x00", headers={"note": "colon: yes"}, receipt="r1")
        subscribe, send = pump_to_server(client, server)
        assert isinstance(subscribe, Subscribe) and subscribe.destination == "/queue/a:b"
        assert isinstance(send, Send) and send.body == b"\x00binary\x00" and send.headers["note"] == "colon: yes"

        server.send_message(
            destination=send.destination,
            subscription=subscribe.id,
            message_id="m:1",
            ack="ack-1" if version == "1.2" else None,
            headers={"note": send.headers["note"]},
            body=send.body,
        )
        server.send_receipt("r1")
        server.send_heartbeat()
        message, receipt = pump_to_client(server, client)
        assert isinstance(message, MessageReceived) and message.body == b"\x00binary\x00"
        assert message.message_id == "m:1" and message.subscription == "sub-1"
        assert receipt == ReceiptReceived("r1")

        ack_id = message.ack if version == "1.2" else message.message_id
        assert ack_id is not None
        client.ack(ack_id, subscription=message.subscription)
        client.disconnect(receipt="bye")
        ack, disconnect = pump_to_server(client, server)
        assert ack == Ack(ack_id, "sub-1", None, None)
        assert disconnect == Disconnect("bye")
        server.send_receipt("bye")
        server.close()
        assert pump_to_client(server, client) == [ReceiptReceived("bye")]
        assert server.closed
