"""Data files shipped with the gateway for its own use (read with :mod:`importlib.resources`).

``calendar-vn.toml``: the overlay of official changes to the Vietnamese working-day calendar
(swaps, make-up Saturdays, holidays not yet in law), read by :mod:`gateway.workdays`.
"""
