"""The gateway's memory of finished /v1/responses, for ``previous_response_id`` and GET."""

from __future__ import annotations

from collections import OrderedDict

from .errors import ApiError


class ResponseStore:
    """Finished responses by id, least recently used dropped past ``capacity``."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, tuple[dict, list[dict]]] = OrderedDict()

    def put(self, response: dict, conversation: list[dict]) -> None:
        if self.capacity <= 0:
            return
        self._items[response["id"]] = (response, conversation)
        self._items.move_to_end(response["id"])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, response_id: str) -> tuple[dict, list[dict]]:
        item = self._items.get(response_id)
        if item is None:
            raise ApiError(404, f"No response with id '{response_id}' found (it may have been dropped from this gateway's store)", "previous_response_id", "not_found")
        self._items.move_to_end(response_id)
        return item
