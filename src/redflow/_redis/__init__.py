"""Redis access: a pipelined connection, a client with reconnects, and pub/sub."""
