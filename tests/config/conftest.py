"""The components these tests build live in ``tests.config.components``: a module of the
user's own, as far as the allow-list is concerned, so each test trusts it as a user would
(``imports: [tests]``)."""

import pytest

from attune.config.allowlist import trusted


@pytest.fixture(autouse=True)
def trust_test_components():
    with trusted(["tests"]):
        yield
