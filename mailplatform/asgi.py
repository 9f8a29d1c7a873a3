import os

import django

from mailplatform.database import web_pool_enable

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mailplatform.settings")
# The web server pools its PostgreSQL connections (mailplatform/database.py says why).
web_pool_enable()
django.setup(set_prefix=False)

# The middleware and the view in one thread hop (mailplatform/handlers.py says why).
from mailplatform.handlers import SynchronousChainASGIHandler  # noqa: E402

django_application = SynchronousChainASGIHandler()

# The long-poll endpoints skip the synchronous middleware (see mailboxes/asgi.py).
from mailboxes.asgi import is_waiting_path, waiting_application  # noqa: E402


async def application(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "http" and is_waiting_path(scope.get("path", "")):
        await waiting_application(scope, receive, send)
    else:
        await django_application(scope, receive, send)
