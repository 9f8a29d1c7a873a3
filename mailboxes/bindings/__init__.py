"""Mailbox pools and account bindings: mailboxes handed out to a host application's external
accounts, and the verification codes those accounts receive (issue: pools and bindings).

``services`` writes (allocation under row locks), ``selectors`` reads through the principal,
``attribution`` decides which provider a message comes from, ``metrics`` counts a pool.
"""
