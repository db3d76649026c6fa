"""Background loops that keep the router's picture of the upstreams current.

`router.sync.orders`: order and refill statuses (and the refunds they trigger).
`router.sync.providers`: provider balances and catalogues.

They never run on the request path: the API answers from SQLite and memory, these loops keep
that current.
"""
