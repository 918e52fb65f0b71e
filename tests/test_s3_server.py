"""The loopback S3 server the object-storage tests rely on answers like S3 (a ranged read of
an object written through fsspec), so a failure there is told apart from dckpt's own."""
import fsspec


def test_loopback_s3_round_trip(s3_bucket):
    fs = fsspec.filesystem("s3")
    fs.pipe(f"{s3_bucket}/probe", bytes(range(256)) * 4)
    assert fs.cat_file(f"{s3_bucket}/probe", start=10, end=20) == bytes(range(10, 20))
    assert fs.size(f"{s3_bucket}/probe") == 1024
