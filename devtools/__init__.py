"""Development helpers: a real local Redis server for ``make up`` and the tests."""
