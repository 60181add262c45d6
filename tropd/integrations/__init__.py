"""Integrations with other training stacks (optional extras): :mod:`tropd.integrations.trl`."""
