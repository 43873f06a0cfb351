"""closedloop.streams"""
