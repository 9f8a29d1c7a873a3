import os

from django.core.asgi import get_asgi_application

from mailplatform.database import web_pool_enable

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
# The web server pools its PostgreSQL connections (mailplatform/database.py says why).
web_pool_enable()
django_application = get_asgi_application()

# The long-poll endpoints skip the synchronous middleware (see mailboxes/asgi.py).
from mailboxes.asgi import is_waiting_path, waiting_application  # noqa: E402


async def application(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "http" and is_waiting_path(scope.get("path", "")):
        await waiting_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
