"""The obd command line."""
