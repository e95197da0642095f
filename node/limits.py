"""Every fixed timeout, interval and limit of the node, with its default, in one place.

What an operator may change lives in node.toml (node/config.py: each key with its bounds and its
default, and the shipped node.toml documents them); everything else is here. A payload's own
bounds (prompt length, image sides, seeds) are part of its realm's payload struct
(models/<realm>.py). The modules that use a value import it under the name they always used, so
a test can still set ``rentahal.p2p.query.IDLE_CLOSE`` for the module it exercises.

This module imports nothing: every layer (p2p/, realms/, models/, node/) may read it.
Times are seconds, sizes bytes, unless a name says otherwise.
"""

# --- The UI port: HTTP and websocket clients --------------------------------------------------------

# node/http.py
MAX_HEAD = 16 * 1024  # bytes of request line + headers
HEAD_TIMEOUT = 10.0  # seconds a client may take to send its request head
BODY_TIMEOUT = 60.0  # seconds an API client may take to send its request body
WRITE_TIMEOUT = 30.0  # seconds a streamed answer waits for a client that reads nothing
UI_CONNECTIONS = 512  # open UI connections in all (each holds a file descriptor)
UI_CONNECTIONS_PER_CLIENT = 64  # served at once per IPv4 address / IPv6 /64
UI_PENDING_PER_CLIENT = 128  # connections per client that have not sent their request yet
UI_RESERVED_CONNECTIONS = 16  # places only the sysop's CLI may take (see serve_ui)
UI_RETRY_AFTER = 5  # seconds, in a 503's Retry-After
WS_FREE_MESSAGE = 64 * 1024  # websocket messages below this need no room in the message budget
WS_MESSAGE_BUDGET = 64 * 1024 * 1024  # larger messages buffered at once, all clients together
WS_RECEIVE_BYTES = 64 * 1024  # read from a websocket at once
# node/control.py
WS_MEDIA_SLACK = 64 * 1024  # a media request's JSON around its base64 payload
WS_INFLIGHT_PER_CONNECTION = 16  # requests one websocket may have in progress at once
# cli.py
SHUTDOWN_TIMEOUT = 20.0  # a node still stopping this long after SIGINT/SIGTERM exits anyway (a stuck backend)
# node/client.py
CLI_CONNECT_TIMEOUT = 5.0  # seconds a node has to accept a client and answer its hello

# --- Queries, users and their subscribers -----------------------------------------------------------

# node/queries.py
SUBSCRIBER_TIMEOUT = 10.0  # a client that does not take an event within this stops listening
QUERY_SUBSCRIBERS = 8  # clients watching one query (the oldest is dropped for a new one)
MAX_BANS_CACHED = 65536  # users whose ban state is kept in memory
# node/dashboard.py
DASHBOARD_INTERVAL = 1.0  # seconds between snapshots
DASHBOARD_SUBSCRIBERS = 4096  # dashboards served one snapshot a second
# node/storage.py
SQLITE_BUSY_TIMEOUT = 5.0  # a shard locked by another writer is waited for this long
DURATIONS_KEPT = 1000  # per realm, for p95

# --- The local executor and its backends ------------------------------------------------------------

# node/executor.py
LOADING_RETRY_AFTER = 1.0  # seconds a peer asking while a model loads is told to wait
WATCHDOG_GRACE = 5.0  # a backend past its query's deadline gets this long before it is called hung
# models/chat.py
# At most ~50 token events a second: a real model (20-100 tokens/s) is not slowed by this, and
# a fast one does not pay the node's per-event work (JSON, websocket, libp2p frame) per token.
MIN_TOKEN_EVENT_INTERVAL = 0.02
# models/speech.py
DEFAULT_MAX_AUDIO_BYTES = 32 * 1024 * 1024  # an audio upload to transcribe
AUDIO_CONVERT_TIMEOUT = 60.0  # ffmpeg's decoding of one upload
TTS_TIMEOUT = 60.0  # espeak-ng's synthesis of one text
# models/vision.py
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024  # an image for the vision realm
DEFAULT_MAX_PIXELS = 4096 * 4096  # ... and its pixels, read from its header before decoding
IMAGE_HEADER_STEPS = 20_000  # JPEG segments / GIF blocks walked before giving up
# models/gpu.py
FIT_RESERVE_MIB = 512  # GPU memory (MiB) left free when deciding whether a model fits
NVIDIA_SMI_TIMEOUT = 5.0  # the GPU probe at start
# models/external.py
EXTERNAL_CONNECT_TIMEOUT = 10.0  # an external model server's connect
EXTERNAL_READ_TIMEOUT = 300.0  # between two pieces of a streamed answer (a slow server's first token)

# --- Peers: who is remembered, blocked, pinged, redialed --------------------------------------------

# node/peer_memory.py
REMEMBER_PEERS_FOR = 7 * 86400.0  # a restarted node redials peers seen within this long
REMEMBERED_PEERS = 64  # ... at most this many of them
REMEMBER_INTERVAL = 2.0  # new peers' addresses are stored at most this often (after a new connection)
REMEMBER_LOOK = 10.0  # ... and known peers' changed addresses at least this often
REMEMBER_REFRESH = 300.0  # a known peer's stored addresses are rewritten at most this often
MAX_REMEMBERED = 5000  # peers whose last stored addresses are kept in memory
# node/violations.py
VIOLATION_WINDOW = 60.0  # protocol violations are counted over this window
VIOLATION_LIMIT = 20  # protocol violations in a window before a peer is blocked
VIOLATION_BLOCK = 600.0  # seconds it stays blocked
VIOLATIONS_TRACKED = 5000  # peers whose recent violations are kept
# p2p/maintenance.py
PING_INTERVAL = 30.0  # connected peers are pinged this often
PING_TIMEOUT = 3.0  # ... and must answer within this
PROBE_EVERY = 0.25  # how often quiet peers are looked for
PROBE_TIMEOUT = 0.5  # a quiet peer that does not answer a ping within this is unresponsive
DEAD_AFTER_STALE = 6.0  # seconds a connected peer may be stale before its connection is closed
BOOTSTRAP_REDIAL_MAX = 5.0  # the longest wait between two dials of an unreachable bootstrap peer
SWEEP_INTERVAL = 1.0  # how often peers to (re)dial are looked for
REDIAL_MIN = 2.0  # a lost peer is redialed after this, doubling ...
REDIAL_MAX = 60.0  # ... up to this
MAX_PARALLEL_DIALS = 8  # dials in flight at once
# Beyond this many connections, peers are dialed when a query needs them, not in advance: a
# federation of thousands must not turn into a full mesh.
SWEEP_MAX_CONNECTIONS = 64
# p2p/host.py
DIAL_MAX_DIRECT = 4  # direct addresses tried per dial (a record may claim 16)
DIAL_MAX_CIRCUITS = 2  # relay addresses tried per dial
HANDSHAKE_TIMEOUT = 10.0  # seconds an inbound connection may take to finish Noise + Yamux
# p2p/mdns.py
MDNS_DIALS_PER_MINUTE = 30  # peers found on the LAN dialed per minute at most

# --- Discovery, reachability, relays ----------------------------------------------------------------

# p2p/discovery.py
PROVIDE_TIMEOUT = 30.0  # one advertisement of a realm in the DHT
LOOKUP_TIMEOUT = 10.0  # one lookup of a realm's providers
LOOKUP_MAX_DIALS = 8  # providers dialed per lookup (DHT answers are hints, and may be many)
# p2p/reachability.py
DIAL_BACK_MAX_MESSAGE = 4096  # a dial-back request or answer
DIAL_BACK_MAX_PORTS = 2  # addresses a peer may ask to be dialed back on
DIAL_BACK_TIMEOUT = 3.0  # one dial-back
DIAL_BACK_PER_PEER_INTERVAL = 10.0  # a peer may ask us at most this often
DIAL_BACK_TICK = 1.0  # new witnesses are looked for at most this often (at each new connection)
DIAL_BACK_LOOK_MAX = 60.0  # ... and at least this often
DIAL_BACK_REASK_AFTER = 120.0  # a witness is asked again after this long
DIAL_BACK_WITNESSES = 3  # witnesses asked per tick at most
DIAL_BACK_ANSWER_TTL = 1800.0  # an answer older than this no longer counts
DIAL_BACK_CONFIRMATIONS = 2  # witnesses (distinct IPs) that must reach an address before it is advertised
# p2p/relay.py
TARGET_RELAYS = 2  # relay reservations a node behind a NAT keeps
RESERVE_TIMEOUT = 10.0  # one reservation request
RETRY_RELAY_AFTER = 10.0  # a relay that refused is asked again after this
RELAY_CHECK_INTERVAL = 1.0  # how often reservations are looked at
RESERVATION_TTL = 600  # seconds; the library renews 30 s before expiry
DCUTR_DIALS_PER_MINUTE = 12  # hole-punching attempts per minute at most

# --- Health records and their gossip ----------------------------------------------------------------

# p2p/gossip.py
MAX_RECORD_SKEW = 120.0  # seconds between a record's timestamp and this clock
GOSSIP_MAX_AUTHORS = 5000  # peers whose latest record is kept for replay checks
GOSSIP_MAX_WARNINGS = 1000  # forwarders remembered as already logged
GOSSIP_BYTES_PER_MESSAGE = 4096  # a forwarder's byte budget: this many per message of its budget
GOSSIP_COOL_DOWN = 10.0  # seconds a forwarder that flooded its stream has its new streams reset
GOSSIP_READ_CHUNK = 65536  # read from a gossip stream at once
ADDRS_TTL = 5.0  # seconds this node's advertised addresses are kept between reads (p2p/host.py)
ADDRS_PARSED_KEPT = 4096  # addresses whose parse and scope are kept (p2p/addrs.py)
INTERFACES_TTL = 5.0  # seconds the host's interface addresses are kept between reads
PEER_IDS_KEPT = 4096  # decoded peer IDs remembered (p2p/host.py libp2p_id)
SUBSCRIPTION_WAIT = 3.0  # seconds a new peer's subscription is waited for before publishing to it
SENDER_RECORDS_KEPT = 4096  # (peer, signed peer record) pairs remembered as already verified
SENDER_RECORD_RECHECK = 600.0  # seconds before the same peer record is verified (and stored) again
# p2p/health.py
MAX_RECORD_BYTES = 16 * 1024  # one signed health record

# --- The query protocol: frames, streams, buffers ---------------------------------------------------

# p2p/wire.py
DEFAULT_MAX_FRAME = 8 * 1024 * 1024  # one query-protocol frame
MAX_TOKEN_BYTES = 64 * 1024  # UTF-8 bytes of Token.text
MAX_DEADLINE_MS = 86_400_000  # the longest deadline a query may carry (a day)
# p2p/query.py
WRITE_BATCH = 256 * 1024  # frames queued together go out in one write, up to this many bytes
RESPONDER_QUEUE = 64  # frames an executor's stream buffers before its queries wait
MAX_ACTIVE_PER_STREAM = 64  # queries in progress on one stream
MAX_STREAMS_PER_PEER = 8  # query streams a peer may hold open here (an honest one uses one)
FRAME_BUFFER_PER_PEER = 16 * 1024 * 1024  # bytes of unfinished frames buffered for one peer
FRAME_BUFFER_TOTAL = 64 * 1024 * 1024  # ... and for all peers together
MAX_BUFFERED_EVENTS = 4096  # per attempt, between the stream reader and the router
IDLE_CLOSE = 60.0  # a requester closes its stream to a peer after this long without queries
ABANDON_POLL = 0.1  # how often an abandoned attempt's stream is looked at
# p2p/budget.py
FRAME_FREE_BELOW = 64 * 1024  # frames smaller than this need no reservation
REFUSAL_LOG_EVERY = 60.0  # seconds between two log lines about the same refused key

# --- Routing and spot-checks ------------------------------------------------------------------------

# realms/router.py
MAX_BACKPRESSURE_RETRIES = 50  # busy/queue_full answers one query may wait out
REVIVE_WAIT = 5.0  # seconds a query whose executors all vanished waits for one to come (back)
REVIVE_POLL = 0.1  # how often the peer table is read meanwhile
RETRY_VANISHED = 1.0  # an executor whose stream died under a query is tried again after this, or on a new connection
BACKOFF_CAP = 5.0  # seconds: the longest wait a doubled retry-after reaches
# realms/spotcheck.py
CAUGHT_BLOCK = 3600.0  # seconds a peer caught answering wrong stays out of routing
FIRST_CHECK_DELAY = (2.0, 20.0)  # a new peer is checked this long (uniform) after it is live: spread,
# so that a federation meeting a newcomer does not send it all its canaries at once
SPOT_CHECKS_IN_FLIGHT = 2  # checks in flight at once
CANARY_DEADLINE = 60.0  # one spot-check query
