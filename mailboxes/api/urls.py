from rest_framework.routers import SimpleRouter

from mailboxes.api import views

router = SimpleRouter()
router.register("mailboxes", views.MailboxViewSet, basename="mailbox")

urlpatterns = router.urls
