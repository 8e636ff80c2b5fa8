"""LIO configuration through rtslib-fb: user backstores, tcm_loop LUNs, /dev/sdX discovery."""
