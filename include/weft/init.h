// weft::init(): the world communicator from the launcher's environment.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "weft/communicator.h"
#include "weft/options.h"

namespace weft {

// Where this process stands in its job, as told by the launcher.
struct LaunchEnvironment {
  // "weft", "mpirun", "slurm", "torchrun".
  std::string launcher;
  int rank = 0;
  int size = 1;
  int local_rank = 0;
  int local_size = 1;
  // The rendezvous store, host and port.
  std::string store_host;
  uint16_t store_port = 0;
  // The variable(s) that gave the store's address, for messages.
  std::string store_variable;
  // WEFT_STORE=etcd://HOST:PORT[,...]/PREFIX: the store is that etcd cluster
  // (store_host/port: its first endpoint) and no rank serves one.
  std::string store_url;
  // True when rank 0 serves the store itself: under mpirun, srun and
  // torchrun, unless WEFT_STORE_EXTERNAL=1 says a store already runs at
  // WEFT_STORE. False under `weft run` (the launcher serves it).
  bool serve_store = false;
  // The launcher's identity of the job (Open MPI's job id, Slurm's job and
  // step ids, torchrun's run id and agent address): ranks of another job
  // that reach the same store are refused.
  std::string job_id;
};

// Reads the environment:
//  * `weft run`: WEFT_RANK, WEFT_WORLD_SIZE, WEFT_LOCAL_RANK, WEFT_LOCAL_SIZE,
//    WEFT_STORE (host:port), WEFT_JOB_TOKEN.
//  * mpirun (Open MPI): OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE,
//    OMPI_COMM_WORLD_LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_SIZE.
//  * Slurm (srun): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
//    SLURM_NTASKS_PER_NODE (or SLURM_TASKS_PER_NODE).
//  * torchrun: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR,
//    MASTER_PORT.
// The store: under `weft run`, WEFT_STORE (the launcher serves it). Under
// mpirun, srun and torchrun rank 0 serves it, at WEFT_STORE=HOST:PORT when
// set (HOST must be an address of rank 0's host), else at
// MASTER_ADDR:WEFT_STORE_PORT (default MASTER_PORT + 1 under torchrun's
// static rendezvous, whose agent holds MASTER_PORT; MASTER_PORT otherwise),
// else under Slurm on the first host of SLURM_STEP_NODELIST at
// WEFT_STORE_PORT (default derived from SLURM_JOB_ID and SLURM_STEP_ID).
// WEFT_STORE_EXTERNAL=1: a store already runs at WEFT_STORE; nobody serves.
// Launcher variables that disagree (e.g. OMPI_COMM_WORLD_SIZE and
// OMPI_MCA_orte_ess_num_procs, SLURM_NTASKS and SLURM_NPROCS, a local rank
// beyond the local size) are errors.
// Throws weft::InvalidArgument naming the variable that is missing or bad.
LaunchEnvironment detect_launch_environment();

// Builds the world communicator described by detect_launch_environment(),
// serving the store from rank 0 when the launcher does not. The returned
// communicator keeps that store server alive.
std::shared_ptr<Communicator> init(CommOptions options = CommOptions::from_env());

}  // namespace weft
