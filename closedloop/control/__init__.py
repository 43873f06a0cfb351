"""The service: streams in, decisions, pulses out, everything recorded.

The way of a pulse, one module per step::

    LSL chunk ──> streams.reader (acquisition thread, ring buffer)
              ──> control.pipeline.EegPipeline (event loop: ring read, clock guard;
                                                offline: a recording's blocks)
              ──> control.core.DecisionCore (filters, estimator, amplitude gate,
                                             control.trigger_policy.decide)
              ──> stim.scheduler.FireScheduler (fire thread; SimulatedScheduler offline)
              ──> stim.gated.GatedStimulator.fire_now (arm state, the device's truth,
                                                       stim.safety.SafetyGate, the driver)
              ──> control.ledger (pulse records) ──> control.bus (event log, subscribers)

A pulse is decided in :func:`closedloop.control.trigger_policy.decide` (may it fire, and
when) and allowed in :meth:`closedloop.stim.gated.GatedStimulator.fire_now` (may it leave:
nothing else reaches a driver's ``fire``). Every decision has an id (``decision_id``) that
its pulse request, pulse records and MEP records carry.

Rooms:

- :mod:`.service`: the life cycle; opens the rig, runs the EEG pipeline, housekeeping;
- :mod:`.pipeline`: from samples to decision traces and pulse requests, live and offline;
  :mod:`.clock_guard`: no decision on EEG stamped in the future or too old;
- :mod:`.core`: the update cadence, the amplitude gate and the trigger policy's state;
- :mod:`.ledger`: outcomes to pulse records; the decision, refusal and MEP records
  (live and offline alike);
- :mod:`.protocols`: ``start``/``stop`` and the MEP-driven protocols' loop;
- :mod:`.bus`: the event bus (subscribe/unsubscribe);
- :mod:`.api`: what a control plane (MQTT, SIGHUP) may ask; planes depend on it, never on
  the service class;
- :mod:`.runtime`: live settings; :mod:`.stats`, :mod:`.logs`, :mod:`.memory`: helpers.
"""
