from __future__ import annotations

import traceback
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from rentahal.node.startup import leaves
from rentahal.scripts.federation import Federation


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failure raised through nested trio nurseries (py-libp2p's services nest ten deep) is
    printed as groups past Python's display depth, with the assertion itself cut off: the
    report gets the innermost exceptions, with their own tracebacks, as a section of its own."""
    outcome = yield
    report = outcome.get_result()
    if call.excinfo is not None and isinstance(call.excinfo.value, BaseExceptionGroup):
        text = "\n".join("".join(traceback.format_exception(leaf)) for leaf in leaves(call.excinfo.value))
        report.sections.append(("innermost exceptions", text))
