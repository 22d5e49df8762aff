"""Customer logs and the operations sample, from the front end to the core.

core/PROTOCOL.md is the wire contract; DESIGN.md §2 the rules. The L7
front end hands over one plain tuple per finished request; everything
after that lives here, in memory only (nothing is ever written to disk):

    records.py    field order of a log and of a sample record; NDJSON encoding
    sampler.py    the 1% CSPRNG draw and the client pseudonym (keyed HMAC, a
                  key per UTC day, held in memory only)
    shipper.py    batches, gzip, a bounded in-memory queue, mTLS POSTs with
                  retries; exact counts of what was sent, dropped, rejected
    router.py     zone → the shipper of its log region's core (never another
                  region's); the sample → its core
    config.py     logs.yaml, validated into frozen objects
    metrics.py    a Prometheus collector over the shippers' counts
"""
