"""RabbitMQ's reply codes and texts, word for word, so a client sees the same ERROR frame whichever broker
stands behind the gateway. Pure functions: each returns the error for its caller to raise."""

from __future__ import annotations

from typing import Final

from gateway.broker.base import BrokerError

#: Stands for "this argument was not given" when two declarations are compared.
MISSING: Final = object()


def resource(kind: str, name: str, vhost: str) -> str:
    """How RabbitMQ names a queue or exchange in its texts: ``queue 'q' in vhost '/'``."""
    return f"{kind} '{name}' in vhost '{vhost}'"


def not_found(kind: str, name: str, vhost: str) -> BrokerError:
    return BrokerError(404, "not_found", f"no {resource(kind, name, vhost)}")


def precondition_failed(text: str) -> BrokerError:
    return BrokerError(406, "precondition_failed", text)


def access_refused(text: str) -> BrokerError:
    return BrokerError(403, "access_refused", text)


def default_exchange_refused() -> BrokerError:
    """Binding to, unbinding from or declaring the nameless exchange."""
    return access_refused("operation not permitted on the default exchange")


def locked(name: str, vhost: str) -> BrokerError:
    """Another channel's exclusive queue, or a redeclare with the other ``exclusive`` flag."""
    return BrokerError(
        405,
        "resource_locked",
        f"cannot obtain exclusive access to locked {resource('queue', name, vhost)}. It could be originally"
        " declared on another connection or the exclusive property value does not match that of the"
        " original declaration.",
    )


def inequivalent(key: str, resource: str, received: str, current: str) -> BrokerError:
    """A redeclare that does not match the existing queue or exchange."""
    return precondition_failed(
        f"inequivalent arg '{key}' for {resource}: received {received} but current is {current}"
    )


def flag(value: bool) -> str:
    return "'true'" if value else "'false'"


def type_name(value: object) -> str:
    """The AMQP field-table type RabbitMQ would name for ``value``."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str | bytes):
        return "longstr"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "table"
    return type(value).__name__


def arg_value(value: object) -> str:
    """An argument as :func:`inequivalent` quotes it (:data:`MISSING` is ``none``)."""
    if value is MISSING:
        return "none"
    return f"the value '{value}' of type '{type_name(value)}'"
