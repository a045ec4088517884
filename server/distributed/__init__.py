"""Serving one model from several processes (``mlx.launch``): pipeline and tensor modes.

``launch`` starts a rank (join the group, load its part, the handshake, the follower loop);
``link`` is the group, the step broadcast and the watchdog; ``wire`` the step message;
``engine`` rank 0's engine and the other ranks' replay; ``pipeline`` and ``tensor`` the two
ways the model's forward pass crosses ranks. Without ``--distributed`` none of it is imported
by a running server except to check the setting.
"""
