"""yahoo-governor: a shared, Redis-backed rate governor for mail to Yahoo-managed domains."""

__version__ = "0.1.0"
