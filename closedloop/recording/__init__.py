"""closedloop.recording"""
