"""The language server: the only code that speaks LSP (pygls, lsprotocol).

``server`` holds the session state and handlers, ``jsonrpc`` the framing and the guarantee that
every request is answered, ``worker`` the one inference thread with cancellation. Everything
below this package (``suggest``, ``engine``) works on plain text and offsets.
"""
