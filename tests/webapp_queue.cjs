// The web app's side of the BullMQ queue, with its own client (npm bullmq@5), for the tests.
// Usage: node webapp_queue.cjs REDIS_URL QUEUE COMMAND < input.json; prints one JSON value.
//   add:     [{"type": ..., "data": ...}, ...] -> each added as src/lib/queue/index.ts's
//            addTask does (jobId `${type}-${Date.now()}`); prints the job ids, in order
//   paced:   {"jobs": [...], "pause": [low, high]} -> as add, one at a time, a random pause
//            (ms) before each; prints [id, Date.now() just before the add] per job
//   cron:    {"type": ..., "pattern": ...} -> addCronTask: a repeatable job
//   counts:  prints the job counts by state
//   failed:  prints the failed jobs: id, name, failedReason, attemptsMade
//   workers: prints how many clients BullMQ counts as workers of the queue
'use strict'
const { Queue } = require('bullmq')
const Redis = require('ioredis')

async function main() {
  const [redisUrl, queueName, command] = process.argv.slice(2)
  const input = JSON.parse(require('fs').readFileSync(0, 'utf8') || 'null')
  const connection = new Redis(redisUrl, { maxRetriesPerRequest: null })
  // The web app's queue options, as in its src/lib/queue/index.ts.
  const taskQueue = new Queue(queueName, {
    connection,
    defaultJobOptions: {
      attempts: 3,
      backoff: { type: 'exponential', delay: 1000 },
      removeOnComplete: 100,
      removeOnFail: 50,
    },
  })
  const addTask = (type, data, options) =>
    taskQueue.add(type, data, { ...options, jobId: options?.jobId || `${type}-${Date.now()}` })
  let result
  if (command === 'add') {
    result = []
    for (const { type, data } of input) {
      result.push((await addTask(type, data)).id)
    }
  } else if (command === 'paced') {
    result = []
    const [low, high] = input.pause
    for (const { type, data } of input.jobs) {
      await new Promise(resolve => setTimeout(resolve, low + Math.random() * (high - low)))
      const at = Date.now()
      result.push([(await addTask(type, data)).id, at])
    }
  } else if (command === 'cron') {
    result = (await taskQueue.add(input.type, {}, { repeat: { pattern: input.pattern } })).id
  } else if (command === 'counts') {
    result = await taskQueue.getJobCounts('wait', 'active', 'delayed', 'prioritized',
                                          'completed', 'failed', 'paused')
  } else if (command === 'failed') {
    result = (await taskQueue.getFailed(0, -1)).map(job => ({
      id: job.id, name: job.name, failedReason: job.failedReason, attemptsMade: job.attemptsMade,
    }))
  } else if (command === 'workers') {
    result = await taskQueue.getWorkersCount()
  } else {
    throw new Error(`unknown command ${command}`)
  }
  process.stdout.write(JSON.stringify(result) + '\n')
  await taskQueue.close()
  connection.disconnect()
}

main().catch(error => { console.error(error); process.exit(1) })
