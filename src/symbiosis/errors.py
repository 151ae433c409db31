"""Exceptions raised by Symbiosis. Every error a client can cause is a ``SymbiosisError``."""


class SymbiosisError(RuntimeError):
    """Base class of all Symbiosis errors."""


class BadRequestError(SymbiosisError, ValueError):
    """A request the executor refuses: unknown op, wrong shape, dtype or non-finite values.

    Raised in the requesting client only; the executor keeps serving everyone else.
    """


class BaseWeightAccessError(SymbiosisError):
    """Client code tried to read a frozen base weight, which lives only on the executor.

    Raised instead of computing something silently wrong: e.g. DoRA's weight norm, merging an
    adapter into the base weights, weight-based adapter initialisation (PiSSA, OLoRA, LoftQ).
    """


class UnsupportedFeatureError(SymbiosisError):
    """A model or PEFT feature that split execution cannot serve, with the reason why."""


class AuthenticationError(SymbiosisError):
    """The executor service refused the client's token (missing, unknown or revoked)."""


class LimitExceededError(SymbiosisError):
    """A request beyond one of its tenant's limits (concurrency, rows, payload bytes, rate, sessions)."""


class ExecutorUnavailableError(SymbiosisError):
    """The executor service could not be reached, even after retrying with backoff."""
