from tests.recipes.conftest import checkpoint  # noqa: F401 - the small checkpoint fixture
