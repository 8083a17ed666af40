"""The bench starts its clients together; when one fails, the others' endings must still be collected, or asyncio
reports them as unhandled at shutdown (seen in CI: two connections refused by a gateway at max_connections)."""

from __future__ import annotations

import asyncio

import pytest

from app.bench.workload import _every


def test_a_failing_step_is_raised_after_the_others_ended_and_nothing_is_left_unhandled() -> None:
    unhandled: list[dict[str, object]] = []

    async def refused() -> None:
        raise ConnectionRefusedError("at max_connections")

    async def refused_late() -> None:
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:  # as asyncio.wait_for can turn a cancel into the answer's exception
            raise ConnectionRefusedError("refused too") from None
        raise ConnectionRefusedError("refused too")

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: unhandled.append(context))
        with pytest.raises(ConnectionRefusedError, match="at max_connections"):
            await _every([refused(), refused_late()])

    asyncio.run(main())
    assert unhandled == []
