"""Small `task.kind: command` modules used by the quickstart specs and the tests."""
