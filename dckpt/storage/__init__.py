"""Where bytes live: the local POSIX backend over the native core (local).

The only package that imports dckpt._native. May import format and errors; nothing above.
"""
