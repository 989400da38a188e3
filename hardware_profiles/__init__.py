"""Shipped hardware profile YAML files (package data for edgekit.profiles)."""
