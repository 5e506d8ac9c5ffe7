"""What several test modules share: a real server launcher, the app in-process, small model
versions, the CLI as a subprocess, the admin job helpers. Test modules import from here,
never from each other (and never from bench/, which may import these)."""
