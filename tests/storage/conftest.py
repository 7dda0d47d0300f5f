import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from s3server import SeaweedS3  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One real, credential-enforcing S3 server for the storage tests."""
    with SeaweedS3(tmp_path_factory.mktemp("seaweed")) as server:
        yield server
