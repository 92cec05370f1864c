import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from tiny import TINY  # noqa: E402


@pytest.fixture(params=TINY, ids=[t.name for t in TINY])
def tiny(request):
    return request.param
