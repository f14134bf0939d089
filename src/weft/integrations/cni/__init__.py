"""weft's CNI plugin (`weft-cni`) and the runtime-side helper the testbed uses.

    spec     facts of the CNI specification: versions, error codes, name rules (pure)
    handler  the plugin's logic: env + netconf in, (exit code, stdout) out (pure)
    plugin   the `weft-cni` executable: a thin shell around the handler
    runtime  what a container runtime does: exec a plugin with the CNI environment
"""
