"""The event log API: pull the tenant's events in order, resume from a cursor."""

from __future__ import annotations

import re
from typing import Any
from uuid import UUID

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import exceptions
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils.urls import remove_query_param, replace_query_param
from rest_framework.views import APIView

from audit import selectors
from audit.api.serializers import EventPageSerializer, EventSerializer
from audit.models import EVENT_ID_PATTERN, EVENT_TYPE_PATTERN, Event
from mailplatform.pagination import (
    CURSOR_DESCRIPTION,
    LIMIT_DESCRIPTION,
    invalid_cursor,
    limit_parameter_schema,
    limit_parse,
)

EVENTS_READ = "events:read"  # tenants.access.Permission.EVENTS_READ; audit cannot import it
_DEFAULT_LIMIT, _MAX_LIMIT = 100, 500
_EVENT_ID = re.compile(EVENT_ID_PATTERN)
_EVENT_TYPE = re.compile(EVENT_TYPE_PATTERN)


class EventListView(APIView):
    """The event log, oldest first. Follow ``next`` (or pass ``cursor``) to read on; an empty
    page with a ``next_cursor`` means "nothing new yet, ask again with this cursor"."""

    required_permissions = {"get": EVENTS_READ}

    @extend_schema(
        operation_id="events_list",
        parameters=[
            OpenApiParameter(
                "after",
                OpenApiTypes.STR,
                pattern=f"^{EVENT_ID_PATTERN}$",
                description="Only events after this point: an event id (evt_..., exclusive); `cursor` wins over it",
            ),
            OpenApiParameter("cursor", OpenApiTypes.STR, description=CURSOR_DESCRIPTION),
            OpenApiParameter("type", OpenApiTypes.STR, description="Comma-separated types or prefixes (message.*)"),
            OpenApiParameter("mailbox", OpenApiTypes.UUID, description="Only events about this mailbox"),
            OpenApiParameter("message", OpenApiTypes.UUID, description="Only events about this message"),
            OpenApiParameter(
                "limit",
                limit_parameter_schema(_DEFAULT_LIMIT),
                description=LIMIT_DESCRIPTION.format(default=_DEFAULT_LIMIT, maximum=_MAX_LIMIT),
            ),
        ],
        responses=EventPageSerializer,
    )
    def get(self, request: Request) -> Response:
        principal: Any = request.user
        params = request.query_params
        types = [name.strip() for name in params.get("type", "").split(",") if name.strip()]
        if not all(_EVENT_TYPE.fullmatch(name) for name in types):
            raise exceptions.ValidationError({"type": ["Give event types or prefixes (message.*), comma-separated."]})
        if params.get("after") and not _EVENT_ID.fullmatch(params["after"]):
            raise exceptions.ValidationError({"after": ["Give an event id (evt_...)."]})
        pointers: dict[str, UUID | None] = {}
        for name in ("mailbox", "message"):
            try:
                pointers[f"{name}_id"] = UUID(params[name]) if params.get(name) else None
            except ValueError:
                raise exceptions.ValidationError({name: [f"Must be a {name} id."]}) from None
        queryset = selectors.event_list(principal, types=types, **pointers)
        limit = limit_parse(params.get("limit"), default=_DEFAULT_LIMIT, maximum=_MAX_LIMIT)
        if params.get("cursor"):
            try:
                queryset = selectors.events_after_cursor(queryset, params["cursor"])
            except selectors.InvalidCursor:
                raise invalid_cursor() from None
        elif params.get("after"):
            try:
                queryset = selectors.events_after_event(queryset, principal, params["after"])
            except Event.DoesNotExist:
                raise exceptions.ValidationError({"after": ["No such event."]}) from None
        events = list(queryset[:limit])
        next_cursor = selectors.event_position(events[-1]) if events else params.get("cursor")
        if next_cursor is None and params.get("after"):
            next_cursor = selectors.event_position(selectors.event_get(principal, params["after"]))
        next_url = None
        if next_cursor:
            base = remove_query_param(request.build_absolute_uri(), "after")
            next_url = replace_query_param(base, "cursor", next_cursor)
        return Response(
            {
                "results": [event.as_json() for event in events],
                "next": next_url if len(events) == limit else None,
                "next_cursor": next_cursor,
            }
        )


class EventDetailView(APIView):
    required_permissions = {"get": EVENTS_READ}

    @extend_schema(responses=EventSerializer)
    def get(self, request: Request, event_id: str) -> Response:
        try:
            event = selectors.event_get(request.user, event_id)  # type: ignore[arg-type]
        except Event.DoesNotExist:
            raise exceptions.NotFound() from None
        return Response(selectors.event_detail(request.user, event))  # type: ignore[arg-type]
