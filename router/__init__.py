"""smm-router: one SMM panel API v2 in front of ranked upstream providers."""
