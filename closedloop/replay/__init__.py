"""closedloop.replay"""
