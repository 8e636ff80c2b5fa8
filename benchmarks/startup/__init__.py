"""Cold-start benchmark (issue 6): images built from Debian packages, served by a real registry.

Modules:

* ``layers``      tree snapshots, snapshot diffs and the deterministic gzip layer writer
* ``oci``         image config, manifest and OCI layout output
* ``images``      the benchmark images (debootstrap + apt stages) and their build cache
* ``registry``    a local docker-registry and pushing a layout into it
* ``unpack``      applying layer tars (with whiteouts) to a rootfs directory
* ``service``     starting the image's app in a chroot and polling it over HTTP
* ``traditional`` the baseline: download + gunzip + untar, then start the app
* ``modes``       the modes the driver knows, which of them can run here and now
* ``shaping``     a network namespace whose loopback is shaped with ``tc netem``
* ``report``      the result table and JSON file

Run ``benchmarks/startup/run`` (or ``python -m benchmarks.startup``) as root.
"""
