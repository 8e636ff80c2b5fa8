"""Cold-start benchmark (issue 6): images built from Debian packages, served by a real registry.

Modules:

* ``layers``      tree snapshots, snapshot diffs and the deterministic gzip layer writer
* ``oci``         image config, manifest and OCI layout output
* ``images``      the benchmark images (debootstrap + apt stages) and their build cache
* ``registry``    a local docker-registry, pushing a layout into it, its access log
* ``unpack``      applying layer tars (with whiteouts) to a rootfs directory
* ``service``     starting the image's app in a chroot and polling it over HTTP
* ``result``      one measured cold start (a row of the table)
* ``traditional`` the baseline: download + gunzip + untar, then start the app
* ``lazy``        ``obd mount`` of a converted image, the app started from the mountpoint
* ``modes``       the modes the driver knows, which of them can run here and now
* ``shaping``     a network namespace whose loopback is shaped with ``tc netem``
* ``plan``        what the measuring part needs from the building part, as a file
* ``vm``          re-running the measuring part in the VM harness (no TCMU on the host)
* ``report``      the result table and JSON file
* ``goals``       the goals of issue 6 as PASS / FAIL / NOT MEASURED lines

Run ``benchmarks/startup/run`` (or ``python -m benchmarks.startup``) as root.
"""
