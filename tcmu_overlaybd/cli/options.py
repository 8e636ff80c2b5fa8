"""Options shared by every command that opens an image."""

from __future__ import annotations

import functools

import click

from .. import config
from ..image.options import OpenOptions


def image_options(func):
    """Add --platform, registry access and cache flags; pass ``opts: OpenOptions``."""

    @click.option("--platform", default=None, metavar="OS/ARCH[/VARIANT]",
                  help="Platform to pick from a multi-platform image (default: this host).")
    @click.option("-u", "--user", "user", default=None, metavar="USER[:PASS]",
                  help="Registry credentials (password prompted if omitted).")
    @click.option("--authfile", default=None, type=click.Path(dir_okay=False),
                  help="Credentials file in docker config.json format.")
    @click.option("--tlscacert", default=None, type=click.Path(dir_okay=False),
                  help="CA certificate to trust for the registry.")
    @click.option("--tlscert", default=None, type=click.Path(dir_okay=False),
                  help="Client certificate for the registry (PEM).")
    @click.option("--tlskey", default=None, type=click.Path(dir_okay=False),
                  help="Client key for --tlscert (PEM).")
    @click.option("-k", "--skip-verify", is_flag=True, help="Do not verify the registry's TLS certificate.")
    @click.option("--plain-http", is_flag=True, help="Talk plain HTTP to the registry.")
    @click.option("--cache-dir", default=None, type=click.Path(file_okay=False),
                  help="Block cache directory shared by all mounts.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
    @functools.wraps(func)
    def wrapper(*args, platform, user, authfile, tlscacert, tlscert, tlskey, skip_verify,
                plain_http, cache_dir, quiet, **kwargs):
        username = password = None
        if user:
            username, sep, password = user.partition(":")
            if not sep:
                password = click.prompt(f"Password for {username}", hide_input=True, err=True)
        opts = OpenOptions.from_config(
            config.load(),
            platform=platform, quiet=quiet, username=username, password=password,
            authfile=authfile, tls_ca_cert=tlscacert, client_cert=tlscert, client_key=tlskey,
            skip_verify=skip_verify, plain_http=plain_http, cache_dir=cache_dir,
        )
        return func(*args, opts=opts, **kwargs)

    return wrapper
