"""Test harness, loaded only by events API processes that tests start with this folder on
PYTHONPATH: when $EVENT_STATS_TEST_TOKEN_LOG names a file, every token the login mode issues is
appended to it, so that tests know the real tokens and can look for them where they must never
be (task logs, XComs, tables). The package itself never writes a token anywhere.
"""

import os

_path = os.environ.get("EVENT_STATS_TEST_TOKEN_LOG")
if _path:
    from event_pipeline.events import login

    _issue = login.TokenStore.issue

    def _recording_issue(self: login.TokenStore) -> str:
        token = _issue(self)
        with open(_path, "a", encoding="utf-8") as log:
            log.write(token + "\n")
        return token

    login.TokenStore.issue = _recording_issue
