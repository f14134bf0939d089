"""The systemd units weft ships (package data), and the `weft units` edges that write them.

    weft.service                  the agent on its defaults; settings in /etc/default/weft
    docker.service.d/weft.conf    dockerd on weft's subnet, flags from `weft docker-opts`
"""
