from django.core.files.base import ContentFile
from django.core.files.storage import storages


def test_it_stores_blobs_in_the_s3_server(s3_server):
    storage = storages["blobs"]
    name = storage.save("harness/probe.txt", ContentFile(b"hello s3"))
    body = s3_server.client().get_object(Bucket=s3_server.bucket, Key=name)["Body"].read()
    assert body == b"hello s3"
    storage.delete(name)
