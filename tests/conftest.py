from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rentahal.scripts.federation import Federation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()
