"""Every setting, written once: a dataclass field whose metadata holds its flag, its environment variable,
its help text and its kind, next to its default.

Who reads a definition:

- :class:`Config` below: every setting of the gateway process, in the order of ``--help`` and of the
  README's table. :mod:`gateway.config` turns it into the command line, the environment reader and that
  table (``markdown_table()``; a test keeps the README equal to it).
- The slices of it that each layer takes (``stomp.frames.Limits``, ``stomp.session.SessionSettings``,
  ``connection.ConnectionSettings``) name the :class:`Config` fields they take, with ``DEFAULTS.<name>``
  as their default, and :func:`derive` fills them from a :class:`Config`. So no default, flag or help text
  is repeated, and ``Limits()`` alone still gives the gateway's defaults (what the unit tests use).
- Other processes (``stock_daemon``) declare their own settings dataclasses with :func:`setting`, and read
  them with the same machinery in :mod:`gateway.config`: same value syntax, same one-line errors.

Why the definitions live here and not in :mod:`gateway.config`: the codec and the session are pure (no I/O),
and they take their defaults from these definitions. This module therefore imports nothing but
``dataclasses``: no argparse, no environment, no files. Reading values is :mod:`gateway.config`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Final, TypeVar

__all__ = ["DEFAULTS", "KINDS", "Config", "default_of", "default_text", "derive", "setting", "settings_fields"]

T = TypeVar("T")

#: The kinds of value a setting may have; :mod:`gateway.config` has a reader for each.
KINDS: Final = ("text", "int", "size", "bool", "port", "seconds", "number", "url", "file", "list", "choice")


def setting(
    default: Any,
    flag: str,
    env: str,
    help: str,
    *,
    kind: str | None = None,
    choices: Sequence[str] | None = None,
    minimum: int | None = 1,
    parse: Callable[[str], Any] | None = None,
    show: Callable[[Any], str] | None = None,
    metavar: str | None = None,
) -> Any:
    """A dataclass field that is a setting: ``flag`` (``--name``), ``env`` (the variable), ``help``.

    ``kind`` says how text becomes a value (see :data:`KINDS`; by default ``bool``/``int``/``list`` from the
    default, ``choice`` with ``choices``, else ``text``); ``minimum`` bounds an ``int`` (None: unbounded).
    A list default makes any kind repeatable (each value read with the kind's reader). ``parse`` replaces
    the kind's reader: it raises ``ValueError`` whose message names the bad value and
    what was expected (it follows the flag or variable in the error line). ``show`` formats the default for
    ``--help`` and the README; ``metavar`` names the value in ``--help``. A list or dict default is copied
    for each instance.
    """
    if kind is None:
        if choices is not None:
            kind = "choice"
        elif isinstance(default, bool):
            kind = "bool"
        elif isinstance(default, int):
            kind = "int"
        elif isinstance(default, list):
            kind = "list"
        else:
            kind = "text"
    if kind not in KINDS:
        raise ValueError(f"{flag}: unknown kind {kind!r}")
    meta: dict[str, Any] = {"flag": flag, "env": env, "help": help, "kind": kind, "minimum": minimum}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if kind == "list" or isinstance(default, list):  # repeatable; the variable takes a comma-separated list
        meta["action"] = "append"
    for key, value in (("parse", parse), ("show", show), ("metavar", metavar)):
        if value is not None:
            meta[key] = value
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def settings_fields(*classes: type) -> list[Any]:
    """The fields of ``classes`` that are settings (have a flag), in declaration order."""
    return [f for cls in classes for f in fields(cls) if "flag" in f.metadata]


def default_of(f: Any) -> Any:
    """A field's default value (a fresh one for a default factory)."""
    return f.default if f.default is not MISSING else f.default_factory()


def default_text(f: Any) -> str:
    """A setting's default as ``--help`` and the README show it: ``4 MiB``, ``on``, ``unset``."""
    default = default_of(f)
    if "show" in f.metadata and default is not None:
        return str(f.metadata["show"](default))
    if f.metadata.get("kind") == "size" and isinstance(default, int):
        for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
            if default % factor == 0:
                return f"{default // factor} {unit}"
    if isinstance(default, bool):
        return "on" if default else "off"
    if default is None or default == []:
        return "unset"
    return str(default)


def derive(cls: type[T], source: object) -> T:
    """A ``cls`` whose fields take the same-named attributes of ``source`` (a :class:`Config`, or any object).

    A field that ``source`` lacks keeps its default, except that a field whose default is itself a
    dataclass (``ConnectionSettings.limits``) is derived from ``source`` the same way. This is how the
    settings of each layer come from the one :class:`Config` without a hand copy.
    """
    values: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if not f.init:
            continue
        if hasattr(source, f.name):
            values[f.name] = getattr(source, f.name)
        elif isinstance(f.default_factory, type) and is_dataclass(f.default_factory):
            values[f.name] = derive(f.default_factory, source)
    return cls(**values)


def _leeway(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 3600:
        raise ValueError(f"{text!r} is not valid: expected a number of seconds from 0 to 3600 (e.g. 30)")
    return value


def _networks(text: str) -> list[str]:
    import ipaddress  # pure; kept local so this module's imports stay dataclasses only

    networks = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            networks.append(str(ipaddress.ip_network(part, strict=False)))
        except ValueError:
            raise ValueError(
                f"{part!r} is not valid: expected an IP network such as 10.0.0.0/8 or 2001:db8::/32"
            ) from None
    return networks


@dataclass(slots=True)
class Config:
    """The gateway's configuration: each field is one setting (see :func:`setting`)."""

    host: str = setting("127.0.0.1", "--host", "GATEWAY_HOST", "address to listen on")
    port: int = setting(8181, "--port", "PORT", "WebSocket/HTTP port (ws://HOST:PORT/ws)", kind="port")
    tcp_port: int | None = setting(
        None,
        "--tcp-port",
        "GATEWAY_TCP_PORT",
        "also serve plain STOMP over TCP on this port (61613 is usual)",
        kind="port",
    )
    broker: str = setting(
        "auto",
        "--broker",
        "GATEWAY_BROKER",
        "'rabbitmq', 'memory' (embedded, nothing survives a restart) or 'auto': rabbitmq when an AMQP URL is set",
        choices=["auto", "rabbitmq", "memory"],
    )
    amqp_urls: list[str] = setting(
        [],
        "--amqp-url",
        "AMQP_URL",
        "RabbitMQ URL, amqp:// or amqps://, e.g. amqp://guest:guest@127.0.0.1:5672/ (selects RabbitMQ); "
        "repeatable (env: comma-separated), one per node of a cluster: connections spread over the reachable ones",
        kind="url",
        metavar="URL",
    )
    default_login: str = setting("guest", "--default-login", "GATEWAY_DEFAULT_LOGIN", "login for CONNECT without one")
    default_passcode: str = setting(
        "guest", "--default-passcode", "GATEWAY_DEFAULT_PASSCODE", "passcode for CONNECT without a login"
    )
    default_vhost: str = setting("/", "--default-vhost", "GATEWAY_DEFAULT_VHOST", "vhost for CONNECT without host")
    allowed_origins: list[str] = setting(
        [],
        "--allowed-origin",
        "GATEWAY_ALLOWED_ORIGINS",
        "browser Origin allowed to connect (repeatable; env: comma-separated); none given = any origin; "
        "clients that send no Origin are always accepted",
    )
    jwt_secret_file: str | None = setting(
        None,
        "--jwt-secret-file",
        "GATEWAY_JWT_SECRET_FILE",
        "file holding the shared secret of HS256/384/512 tokens (a trailing newline is ignored); turns tokens on",
        kind="file",
    )
    jwt_key_file: str | None = setting(
        None,
        "--jwt-key-file",
        "GATEWAY_JWT_KEY_FILE",
        "PEM public key or JWKS JSON file (keys chosen by kid) of RS*, PS*, ES* or EdDSA tokens; turns tokens on",
        kind="file",
    )
    jwt_audience: str | None = setting(
        None,
        "--jwt-audience",
        "GATEWAY_JWT_AUDIENCE",
        "what a token's aud must include (unset: the resource server id)",
    )
    jwt_issuer: str | None = setting(
        None, "--jwt-issuer", "GATEWAY_JWT_ISSUER", "what a token's iss must be (unset: not checked)"
    )
    jwt_leeway: float = setting(
        0.0,
        "--jwt-leeway",
        "GATEWAY_JWT_LEEWAY",
        "seconds of clock skew allowed on exp and nbf; a session ends this long after its token's exp",
        kind="number",
        parse=_leeway,
        show=lambda value: f"{value:g} s",
    )
    jwt_cookie: str | None = setting(
        None,
        "--jwt-cookie",
        "GATEWAY_JWT_COOKIE",
        "name of a cookie of the WebSocket upgrade that may carry the token",
    )
    jwt_resource_server_id: str = setting(
        "rabbitmq",
        "--jwt-resource-server-id",
        "GATEWAY_JWT_RESOURCE_SERVER_ID",
        "prefix of the scopes that count (<id>.read:<vhost>/<name>[/<routing key>], as RabbitMQ's OAuth 2.0 plugin)",
    )
    anonymous_scopes: list[str] = setting(
        [],
        "--anonymous-scope",
        "GATEWAY_ANONYMOUS_SCOPES",
        "scope granted to sessions without a token (repeatable; env: comma-separated); with tokens on and none "
        "given, a CONNECT without a token is refused; turns tokens on",
    )
    max_connections: int | None = setting(
        None,
        "--max-connections",
        "GATEWAY_MAX_CONNECTIONS",
        "client connections the gateway takes at once; over it a WebSocket upgrade gets HTTP 503 with Retry-After",
        kind="int",
    )
    max_connections_per_ip: int | None = setting(
        None,
        "--max-connections-per-ip",
        "GATEWAY_MAX_CONNECTIONS_PER_IP",
        "client connections from one address at once; over it a WebSocket upgrade gets HTTP 429 with Retry-After",
        kind="int",
    )
    max_frames_per_second: float | None = setting(
        None,
        "--max-frames-per-second",
        "GATEWAY_MAX_FRAMES_PER_SECOND",
        "frames one session may send per second, in bursts of up to one second's worth; faster senders are "
        "read more slowly, nothing is dropped",
        kind="number",
    )
    trusted_proxies: list[str] = setting(
        [],
        "--trusted-proxy",
        "GATEWAY_TRUSTED_PROXIES",
        "network (CIDR) of load balancers whose X-Forwarded-For or PROXY protocol (v1, v2) header names the "
        "client (repeatable; env: comma-separated)",
        parse=_networks,
    )
    certfile: str | None = setting(
        None, "--certfile", "GATEWAY_CERTFILE", "TLS certificate (PEM) for wss:// and https://", kind="file"
    )
    keyfile: str | None = setting(None, "--keyfile", "GATEWAY_KEYFILE", "TLS private key (PEM)", kind="file")
    compression: bool = setting(
        False,
        "--compression",
        "GATEWAY_COMPRESSION",
        "offer permessage-deflate (costs CPU and ~50 KiB per connection)",
    )
    max_frame_size: int = setting(
        4 * 1024 * 1024, "--max-frame-size", "GATEWAY_MAX_FRAME_SIZE", "largest STOMP frame after CONNECT", kind="size"
    )
    max_frame_size_unauthenticated: int = setting(
        64 * 1024,
        "--max-frame-size-unauthenticated",
        "GATEWAY_MAX_FRAME_SIZE_UNAUTHENTICATED",
        "largest STOMP frame before CONNECT succeeds",
        kind="size",
    )
    max_headers: int = setting(100, "--max-headers", "GATEWAY_MAX_HEADERS", "most headers in one frame")
    max_header_line: int = setting(
        8 * 1024,
        "--max-header-line",
        "GATEWAY_MAX_HEADER_LINE",
        "longest header line (and command line)",
        kind="size",
    )
    max_subscriptions: int = setting(
        1000, "--max-subscriptions", "GATEWAY_MAX_SUBSCRIPTIONS", "most subscriptions one session may hold"
    )
    max_transactions: int = setting(
        100, "--max-transactions", "GATEWAY_MAX_TRANSACTIONS", "most open transactions in one session"
    )
    max_transaction_frames: int = setting(
        10_000,
        "--max-transaction-frames",
        "GATEWAY_MAX_TRANSACTION_FRAMES",
        "most frames buffered in one transaction",
    )
    max_transaction_bytes: int = setting(
        16 * 1024 * 1024,
        "--max-transaction-bytes",
        "GATEWAY_MAX_TRANSACTION_BYTES",
        "bodies one session may hold in open transactions",
        kind="size",
    )
    max_outbound_buffer: int = setting(
        4 * 1024 * 1024,
        "--max-outbound-buffer",
        "GATEWAY_MAX_OUTBOUND_BUFFER",
        "what may wait behind the message being written to one client before it is disconnected as slow",
        kind="size",
    )
    ws_ping_interval: int = setting(
        10,
        "--ws-ping-interval",
        "GATEWAY_WS_PING_INTERVAL",
        "seconds between WebSocket pings to a client that sent nothing meanwhile; its pongs count as life for the "
        "STOMP heart-beat check, so a background tab whose timers the browser throttles is kept (keep it under "
        "twice the clients' heart-beat interval); 0: no pings",
        minimum=0,
    )
    login_timeout: float = setting(
        10.0, "--login-timeout", "GATEWAY_LOGIN_TIMEOUT", "seconds to send CONNECT", kind="seconds"
    )
    heartbeat_min: int = setting(
        1000,
        "--heartbeat-min",
        "GATEWAY_HEARTBEAT_MIN",
        "smallest heart-beat interval the server agrees to, ms",
        minimum=0,
    )
    heartbeat_max: int = setting(
        600_000,
        "--heartbeat-max",
        "GATEWAY_HEARTBEAT_MAX",
        "largest heart-beat interval the server agrees to, ms",
        minimum=0,
    )
    topic_exchange: str = setting("amq.topic", "--topic-exchange", "GATEWAY_TOPIC_EXCHANGE", "exchange behind /topic")
    sessions_per_connection: int = setting(
        500,
        "--sessions-per-connection",
        "GATEWAY_SESSIONS_PER_CONNECTION",
        "STOMP sessions sharing one AMQP connection",
    )
    queue_type: str = setting(
        "classic",
        "--queue-type",
        "GATEWAY_QUEUE_TYPE",
        "type of the queues /queue destinations declare (an x-queue-type header wins); quorum queues keep their "
        "messages across the loss of a minority of a cluster's nodes",
        choices=["classic", "quorum"],
    )
    shared_fanout: bool = setting(
        True,
        "--shared-fanout",
        "GATEWAY_SHARED_FANOUT",
        "consume a non-durable /topic or /exchange subscription once per AMQP connection and fan out in process",
    )
    retain: list[str] = setting(
        [],
        "--retain",
        "GATEWAY_RETAIN",
        "keep the newest message per routing key of this topic exchange (default vhost; repeatable; env: "
        "comma-separated) for SUBSCRIBEs with x-last-value:true",
        metavar="EXCHANGE",
    )
    retain_max_keys: int = setting(
        10_000, "--retain-max-keys", "GATEWAY_RETAIN_MAX_KEYS", "most routing keys kept per retained exchange"
    )
    retain_max_bytes: int = setting(
        16 * 1024 * 1024,
        "--retain-max-bytes",
        "GATEWAY_RETAIN_MAX_BYTES",
        "most message bytes kept per retained exchange (the keys updated least recently go first)",
        kind="size",
    )
    history_size: int = setting(
        0,
        "--history-size",
        "GATEWAY_HISTORY_SIZE",
        "messages kept per shared /exchange or /topic binding for x-recover-from, in gateway memory; 0: off "
        "(MESSAGEs then carry no x-recovery-position)",
        minimum=0,
    )
    history_ttl: float = setting(
        60.0,
        "--history-ttl",
        "GATEWAY_HISTORY_TTL",
        "seconds a message stays recoverable; a binding nobody subscribes to any more is kept (and recorded) "
        "this long",
        kind="seconds",
    )
    history_max_bytes: int = setting(
        4 * 1024 * 1024,
        "--history-max-bytes",
        "GATEWAY_HISTORY_MAX_BYTES",
        "most message bytes kept per shared binding for x-recover-from",
        kind="size",
    )
    max_conflate_interval: float = setting(
        30.0,
        "--max-conflate-interval",
        "GATEWAY_MAX_CONFLATE_INTERVAL",
        "longest x-conflate interval, asked for or reached by slowing down a lagging client",
        kind="seconds",
    )
    stream_prefetch: int = setting(
        100,
        "--stream-prefetch",
        "GATEWAY_STREAM_PREFETCH",
        "prefetch of an ack:auto stream subscription (x-stream-offset) that names none; the gateway acks "
        "each message once written",
    )
    workers: int = setting(
        1,
        "--workers",
        "GATEWAY_WORKERS",
        "gateway processes sharing the port (SO_REUSEPORT); needs RabbitMQ, as the embedded broker is per process",
    )
    with_stock_daemon: bool = setting(
        False, "--with-stock-daemon", "GATEWAY_WITH_STOCK_DAEMON", "run the stock price daemon in this process"
    )
    web_root: str | None = setting(
        None,
        "--web-root",
        "GATEWAY_WEB_ROOT",
        "folder served at / (default: the bundled ticker page; 'none' disables)",
    )
    server_name: str = setting("stomp-ws-gateway/0.1", "--server-name", "GATEWAY_SERVER_NAME", "CONNECTED server header")
    log_level: str = setting(
        "INFO", "--log-level", "LOG_LEVEL", "DEBUG, INFO, WARNING or ERROR", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    log_format: str = setting(
        "text", "--log-format", "LOG_FORMAT", "log lines as text or as JSON objects", choices=["text", "json"]
    )


#: The gateway's defaults, the one place each layer's settings take theirs from. Read it, never change it.
DEFAULTS: Final = Config()

